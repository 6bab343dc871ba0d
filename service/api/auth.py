"""Bearer tokens with scopes and teams: who is calling, may they call this route, and whose work may they see.

Tokens are configured as SHA-256 hashes (``CONVTUNE_AUTH_TOKENS``, see ``convtune token``), never
in clear. A presented token is hashed and compared with every configured hash in constant time;
it is never logged or stored. Every route needs a scope unless it is public:

    GET, HEAD             read (its team's work) or read-all (every team's)
    POST (create, cancel) submit
    admin                 implies read-all and submit, on every team's work

Each token acts for a team (``models.store.teams``): what it submits is its team's, every token of
the team reads and changes it, and another team's work does not exist for it: a 404, never a 403,
so an id tells nothing about who else uses the service (:func:`check_visible`). A ``read-all``
token sees every team's work and changes only its own team's (403 on another's, which it can see).

Public (no token): /healthz, /readyz, /metrics, /openapi.json, /docs and its assets. New
blueprints are protected by this rule with no code of their own. With ``auth_disabled`` every
request acts as the ``anonymous`` admin, and the API says so loudly when it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, request

from models.sealing import SECRET_FIELDS, SealBroken, Sealer, shown_secrets, with_secrets
from models.store.runs import TAG
from models.store.teams import ANONYMOUS_OWNER, team_of
from service.api.errors import Forbidden, NotFound, Unauthorized
from service.api.settings import ApiSettings, TokenConfig

__all__ = [
    "ANONYMOUS", "Principal", "TokenAuth", "check_owner", "check_visible", "current_principal", "hash_token", "init_app", "is_owner", "new_token", "redacted",
]

log = logging.getLogger(__name__)

# Endpoints anyone may call: probes, metrics and the API's own documentation.
PUBLIC_ENDPOINTS = frozenset({
    "health.healthz", "health.readyz", "metrics.metrics", "openapi_json", "docs", "swagger.swagger", "swagger.static", "swagger.oauth2-redirect", "static",
})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the configured token's name, its scopes and its team (None: auth is off, no teams)."""

    name: str
    scopes: frozenset[str]
    team: str | None = None

    def allows(self, scope: str) -> bool:
        if "admin" in self.scopes or scope in self.scopes:
            return True
        return scope == "read" and "read-all" in self.scopes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def sees_all(self) -> bool:
        """Whether it reads every team's work (admin, read-all), not only its own team's."""
        return self.is_admin or "read-all" in self.scopes

    def may_read(self, team: str | None) -> bool:
        """Whether work of ``team`` exists for this caller (work without a team: only for those who see all)."""
        return self.sees_all or (team is not None and team == self.team)

    def may_change(self, team: str | None) -> bool:
        """Whether this caller may cancel or extend work of ``team``: its own team's, or any as an admin."""
        return self.is_admin or (team is not None and team == self.team)


ANONYMOUS = Principal(ANONYMOUS_OWNER, frozenset({"admin"}))


def hash_token(token: str) -> str:
    """The hex SHA-256 the configuration stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return "ct_" + secrets.token_urlsafe(32)


class TokenAuth:
    """Finds the principal of a presented token among the configured hashes."""

    def __init__(self, tokens: list[TokenConfig]):
        self._tokens = [(bytes.fromhex(t.sha256), Principal(t.name, frozenset(t.scopes), t.team_name)) for t in tokens]

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


def check_visible(tags: Mapping[str, str], what: str) -> None:
    """Raise NotFound ("no {what}") unless the caller may read the run whose ``tags`` these are.

    Another team's work answers exactly as an id that does not exist: same status, same words.
    """
    if not current_principal().may_read(team_of(tags)):
        raise NotFound(f"no {what}")


def check_owner(tags: Mapping[str, str], what: str) -> None:
    """Let only the team that submitted ``what`` (or an admin) change it; raises Forbidden.

    Only a caller who can see it gets here (a read-all token, on another team's work): everyone
    else had a 404 from :func:`check_visible`. Something with no team (made by hand) is an admin's.
    """
    team = team_of(tags)
    if not current_principal().may_change(team):
        who = f"team {team!r}" if team else "no team (it has no owner)"
        raise Forbidden(f"{what} belongs to {who}; only that team's tokens or an admin token may change it")


def is_owner(tags: Mapping[str, str]) -> bool:
    """Whether the caller's team owns the run whose ``tags`` these are, or the caller is an admin."""
    return current_principal().may_change(team_of(tags))


REDACTED = "(redacted: only its owner and admins see it)"


def redacted(document: Any, tags: Mapping[str, str], sealer: Sealer | None = None) -> Any:
    """``document`` (a submitted spec as JSON) as answers show it: never a secret field's value (models.sealing).

    Its team and admins see where a callback goes (``https://host:port/...``), others that there is one.
    The value is the run's sealed one (``sealer`` opens it), or, on runs recorded before secrets left
    MLflow, the one still in the spec; a study's comes from its spec in the Optuna storage.
    """
    sealed = tags.get(TAG.SEALED)
    if sealed and sealer is not None:
        try:
            document = with_secrets(document, sealer.unseal(sealed))
        except SealBroken as exc:
            log.warning("a run's callback cannot be shown: %s", exc)
    if is_owner(tags):
        return shown_secrets(document)
    return _redact(document)


def _redact(document: Any) -> Any:
    if isinstance(document, dict):
        return {k: (REDACTED if k in SECRET_FIELDS and v is not None else _redact(v)) for k, v in document.items()}
    if isinstance(document, list):
        return [_redact(v) for v in document]
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
