"""The accept sequence every route that creates work ends with (ARCHITECTURE.md, decision 2): the run recorded
SCHEDULED in MLflow, then its work started (its message sent), then the run counted queued.

A start that fails ends the run failed (``not dispatched: ...``) before the client hears the error,
a broker error as a 503: nothing is half-accepted, and no run stays SCHEDULED with nothing sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from service.api.auth import Principal
from service.api.errors import ServiceUnavailable
from service.api.limits import note_queued
from service.api.quotas import Reservation
from service.api.wiring import Services

__all__ = ["accept_run"]

log = logging.getLogger(__name__)


def accept_run(
    s: Services, principal: Principal, what: str, name: str, tags: dict[str, str], params: dict[str, str], start: Callable[[str], None],
    reservation: Reservation | None = None,
) -> str:
    """Create ``principal``'s run SCHEDULED, call ``start(run_id)`` to send its work, count it queued; the run's id.

    ``what`` names the work in logs (trial, study...). Anything ``start`` raises ends the run failed
    with the error as its reason, then propagates; a redis.RedisError as ServiceUnavailable (503).
    Raises ServiceUnavailable, without a run, when MLflow does not create it. ``reservation``: the
    submit's compute estimate (:mod:`service.api.quotas`), recorded open before the work is sent (so
    its worker's end record always finds it), closed again when the run is ended here.
    """
    run_id = s.runs.create(name, tags, params, principal)
    if reservation is not None:
        reservation.open(run_id)
    try:
        start(run_id)
    except Exception as exc:  # never leave the run SCHEDULED with nothing sent
        detail = _detail(exc)
        log.warning("%s %s not sent, marking it failed: %s", what, run_id, detail)
        s.runs.end_undispatched(run_id, detail)
        if isinstance(exc, redis.RedisError):
            raise ServiceUnavailable(detail) from exc
        raise
    note_queued(s.redis, principal.name, run_id)
    return run_id


def _detail(exc: Exception) -> str:
    if isinstance(exc, ServiceUnavailable):
        return exc.detail
    if isinstance(exc, redis.RedisError):
        return f"the broker (Redis) is unreachable: {exc}"
    return str(exc)
