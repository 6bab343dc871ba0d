"""``Idempotency-Key`` for the POSTs that create something: a retried request creates nothing twice.

    @bp.post("", responses={202: TrialAccepted, **PROBLEMS})
    @idempotent
    def create_trial(body: TrialSpec, header: IdempotencyHeader): ...

The first request with a key claims it in Redis (``SET NX``) with the fingerprint of its method,
path and body (canonical JSON), runs the view and stores the answer for ``idempotency_ttl_s``
(24 h at least). A later request with the same key and the same fingerprint gets the stored answer
again, marked ``Idempotent-Replayed: true``; with another fingerprint, or while the first is still
running, it gets a 409. Keys are per token, so two clients cannot collide. An error answer is not
stored: the key is released and the client may retry with it. The resource itself lives in MLflow;
this record only remembers which resource a key created.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import redis
from flask import Response, current_app, request
from pydantic import BaseModel, Field

from service.api.auth import current_principal
from service.api.errors import IdempotencyConflict, ServiceUnavailable
from service.api.wiring import services

__all__ = ["IdempotencyHeader", "idempotent"]

PENDING_TTL_S = 120  # a claim whose request died with its process frees itself after this
REPLAYED_HEADERS = ("Location", "Content-Type")


class IdempotencyHeader(BaseModel):
    """Headers of a POST that creates something."""

    idempotency_key: str | None = Field(
        default=None, alias="Idempotency-Key", min_length=1, max_length=255,
        description="Any unique string (a UUID); a retry with the same key and body returns the original answer, with another body a 409. Remembered 24 h.",
    )


def _fingerprint() -> str:
    raw = request.get_data()
    try:
        body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")) if raw else ""
    except ValueError:
        body = raw.decode(errors="replace")
    return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()


def _record_key(key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"convtune:idempotency:{current_principal().name}:{digest}"


def idempotent(view: Callable[..., Any]) -> Callable[..., Any]:
    """Make a creating view replay its answer for a repeated ``Idempotency-Key`` (see the module)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = request.headers.get("Idempotency-Key")
        if not key:
            return view(*args, **kwargs)
        s = services()
        record_key, fingerprint = _record_key(key), _fingerprint()
        try:
            claimed = s.redis.set(record_key, json.dumps({"state": "pending", "fingerprint": fingerprint}), nx=True, ex=PENDING_TTL_S)
            if not claimed:
                return _replay(s.redis.get(record_key), fingerprint)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the idempotency store (Redis) is unreachable: {exc}") from exc
        try:
            response = current_app.make_response(view(*args, **kwargs))
        except BaseException:
            _release(s.redis, record_key)
            raise
        if response.status_code >= 300:
            _release(s.redis, record_key)
            return response
        stored = {
            "state": "done", "fingerprint": fingerprint, "status": response.status_code,
            "headers": {h: response.headers[h] for h in REPLAYED_HEADERS if h in response.headers},
            "body": response.get_data(as_text=True),
        }
        try:
            s.redis.set(record_key, json.dumps(stored), ex=s.settings.idempotency_ttl_s)
        except redis.RedisError:
            current_app.logger.warning("could not store the answer of an idempotent request; a retry with its key would create again")
        return response

    return wrapper


def _replay(raw: bytes | None, fingerprint: str) -> Response:
    if raw is None:  # expired between SET NX and GET: ask for a retry
        raise IdempotencyConflict("this Idempotency-Key's first request just ended; retry", headers={"Retry-After": "1"})
    record = json.loads(raw)
    if record["fingerprint"] != fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request body; use a new key for a new request")
    if record["state"] == "pending":
        raise IdempotencyConflict("the first request with this Idempotency-Key is still being processed; retry shortly", headers={"Retry-After": "1"})
    response = Response(record["body"], status=record["status"], headers=record["headers"])
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _release(client: redis.Redis, record_key: str) -> None:
    try:
        client.delete(record_key)
    except redis.RedisError:
        pass  # the pending claim expires on its own
