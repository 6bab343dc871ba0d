"""Bearer tokens with scopes: who is calling, and may they call this route.

Tokens are configured as SHA-256 hashes (``CONVTUNE_AUTH_TOKENS``, see ``convtune token``), never
in clear. A presented token is hashed and compared with every configured hash in constant time;
it is never logged or stored. Every route needs a scope unless it is public:

    GET, HEAD             read
    POST (create, cancel) submit
    admin                 implies read and submit; may also cancel trials other tokens submitted

Public (no token): /healthz, /readyz, /metrics, /openapi.json, /docs and its assets. New
blueprints are protected by this rule with no code of their own. With ``auth_disabled`` every
request acts as the ``anonymous`` admin, and the API says so loudly when it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, request

from service.api.errors import Forbidden, Unauthorized
from service.api.settings import ApiSettings, TokenConfig

__all__ = ["ANONYMOUS", "Principal", "TokenAuth", "check_owner", "current_principal", "hash_token", "init_app", "is_owner", "new_token", "redacted"]

log = logging.getLogger(__name__)

# Endpoints anyone may call: probes, metrics and the API's own documentation.
PUBLIC_ENDPOINTS = frozenset({
    "health.healthz", "health.readyz", "metrics.metrics", "openapi_json", "docs", "swagger.swagger", "swagger.static", "swagger.oauth2-redirect", "static",
})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the configured token's name and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


ANONYMOUS = Principal("anonymous", frozenset({"admin"}))


def hash_token(token: str) -> str:
    """The hex SHA-256 the configuration stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return "ct_" + secrets.token_urlsafe(32)


class TokenAuth:
    """Finds the principal of a presented token among the configured hashes."""

    def __init__(self, tokens: list[TokenConfig]):
        self._tokens = [(bytes.fromhex(t.sha256), Principal(t.name, frozenset(t.scopes))) for t in tokens]

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose hash matches ``token``; every hash is compared, in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, principal in self._tokens:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def required_scope(method: str) -> str:
    return "read" if method in READ_METHODS else "submit"


def current_principal() -> Principal:
    """The caller of the current request (``anonymous`` on public routes and with auth off)."""
    return g.get("principal", ANONYMOUS)


def check_owner(owner: str | None, what: str) -> None:
    """Let only the token that submitted ``what`` (or an admin) change it; raises Forbidden.

    Something with no owner (made before owners were recorded, or by hand) is an admin's to change.
    """
    if not is_owner(owner):
        who = "another token" if owner else "no token (it has no owner)"
        raise Forbidden(f"{what} was submitted by {who}; only its owner or an admin token may change it")


def is_owner(owner: str | None) -> bool:
    """Whether the caller submitted what ``owner`` names, or is an admin."""
    principal = current_principal()
    return principal.is_admin or (owner is not None and owner == principal.name)


SECRET_FIELDS = frozenset({"callback_url"})
REDACTED = "(redacted: only its owner and admins see it)"


def redacted(document: Any, owner: str | None) -> Any:
    """``document`` (a submitted spec as JSON) with every secret-bearing field hidden unless the caller owns it."""
    if is_owner(owner):
        return document
    if isinstance(document, dict):
        return {k: (REDACTED if k in SECRET_FIELDS and v is not None else redacted(v, owner)) for k, v in document.items()}
    if isinstance(document, list):
        return [redacted(v, owner) for v in document]
    return document


def init_app(app: Flask, settings: ApiSettings) -> None:
    """Check the bearer token and scope of every request before its view runs."""
    if settings.auth_disabled:
        log.warning("!!! AUTHENTICATION IS DISABLED (CONVTUNE_AUTH_DISABLED=true): anyone who reaches this API can submit and cancel. Use it for the local stack only. !!!")
        app.before_request(_anonymous)
        return
    if not settings.auth_tokens:
        log.warning("no API tokens are configured (CONVTUNE_AUTH_TOKENS): every protected route answers 401. Create one with `convtune token NAME`.")
    auth = TokenAuth(settings.auth_tokens)

    def authorize() -> None:
        if request.url_rule is None or request.endpoint in PUBLIC_ENDPOINTS:
            return  # 404/405 answer as usual; public routes need no token
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send a bearer token: 'Authorization: Bearer <token>'")
        principal = auth.authenticate(token.strip())
        if principal is None:
            raise Unauthorized("the bearer token is not valid")
        g.principal = principal
        scope = required_scope(request.method)
        if not principal.allows(scope):
            raise Forbidden(f"token '{principal.name}' lacks the '{scope}' scope this route needs (it has: {', '.join(sorted(principal.scopes))})")

    app.before_request(authorize)


def _anonymous() -> None:
    g.principal = ANONYMOUS
