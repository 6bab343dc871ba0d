"""/healthz (the process is up) and /readyz (Redis and MLflow answer)."""

from __future__ import annotations

import redis
from flask_openapi3 import APIBlueprint, Tag

from service.api.errors import ServiceUnavailable
from service.api.openapi import PUBLIC_ERRORS
from service.api.schemas import Health
from service.api.wiring import services

__all__ = ["bp"]

bp = APIBlueprint("health", __name__, abp_tags=[Tag(name="health")], abp_responses=PUBLIC_ERRORS)


@bp.get("/healthz", responses={200: Health})
def healthz():
    """Answer while the process is up, whatever its dependencies do."""
    return Health(status="ok").model_dump()


@bp.get("/readyz", responses={200: Health, 503: Health})
def readyz():
    """Check that Redis and MLflow answer; 503 names the one that does not."""
    s = services()
    checks = {}
    try:
        s.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        s.runs.ping()
        checks["mlflow"] = "ok"
    except ServiceUnavailable as exc:
        checks["mlflow"] = exc.detail
    ready = all(v == "ok" for v in checks.values())
    return Health(status="ok" if ready else "unavailable", checks=checks).model_dump(), 200 if ready else 503
