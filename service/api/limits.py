"""Per-token rate limits shared by every API process (flask-limiter on Redis), and submit quotas.

Two limits apply to each token (to the client's address when auth is off), counted across all
routes and all gunicorn processes in Redis: ``rate_limit`` on every request and
``submit_rate_limit`` on POSTs. A request past one is a 429 problem with ``Retry-After``. Probes,
metrics and the documentation are exempt. Quotas on what a token may have waiting
(:func:`check_queued_quota`, counted in MLflow only near the cap) are a 429 too; bounds on a single spec (epochs, trials per study,
parallelism) are 422s from :func:`check_study_caps` and :mod:`service.api.admission`.
"""

from __future__ import annotations

import logging
import math
import time

import redis
from flask import Flask, request
from flask_limiter import ApplicationLimit, Limiter
from flask_limiter.errors import RateLimitExceeded

from models.store.keys import queued_key
from service.api.auth import PUBLIC_ENDPOINTS, Principal, current_principal
from service.api.errors import FieldError, InvalidSpec, ServiceUnavailable, TooManyRequests, problem_response
from service.api.runs import RunStore
from service.api.settings import ApiSettings

__all__ = ["check_queued_quota", "check_study_caps", "init_app", "note_queued"]

log = logging.getLogger(__name__)


def _limit_key() -> str:
    principal = current_principal()
    return f"token:{principal.name}" if principal.name != "anonymous" else f"addr:{request.remote_addr}"


def _exempt() -> bool:
    return request.url_rule is None or request.endpoint in PUBLIC_ENDPOINTS


def init_app(app: Flask, settings: ApiSettings) -> Limiter:
    """Count every request against its token's limits in Redis; answer a breach with 429."""
    limiter = Limiter(
        _limit_key, app=app, storage_uri=settings.redis_url, storage_options={"socket_timeout": settings.redis_timeout_s, "socket_connect_timeout": settings.redis_timeout_s},
        key_prefix="convtune:ratelimit", strategy="moving-window", headers_enabled=True, swallow_errors=True,
        application_limits=[
            ApplicationLimit(settings.rate_limit, exempt_when=_exempt, scope="all"),
            ApplicationLimit(settings.submit_rate_limit, methods=["POST"], exempt_when=_exempt, scope="submit"),
        ],
    )

    def too_many(exc: RateLimitExceeded):
        current = limiter.current_limit
        retry_after = math.ceil(current.reset_at - time.time()) if current is not None else 1
        who = current_principal().name
        return problem_response(TooManyRequests(f"rate limit of {exc.description} reached for '{who}'; retry after {retry_after}s", retry_after_s=retry_after))

    app.register_error_handler(RateLimitExceeded, too_many)
    return limiter


# A member of every index, so that an owner with nothing queued still has one (an absent index is unknown).
_PRESENT = ""
_INDEX_TTL_S = 3600  # counted again in MLflow at least this often, whatever the index says


def check_queued_quota(runs: RunStore, redis_client: redis.Redis, principal: Principal, settings: ApiSettings) -> None:
    """Raise 429 when ``principal`` (a token) already has ``max_queued_trials_per_token`` trials, studies or range tests waiting.

    Counting them is a search of MLflow that reads every queued run of the owner: on every submit it made
    accepting O(backlog). Redis keeps the runs accepted since the last count (:func:`note_queued`):
    started or ended ones stay in it, so its size bounds the queue from above, and the search runs only
    when that bound reaches the cap, when the index is missing (first submit, Redis restarted) or an hour
    old; the search then starts the index again from the runs really queued.
    Called after the spec's own checks, so a bad spec is a 422 whatever the quota (and costs no MLflow call).
    """
    cap = settings.max_queued_trials_per_token
    key = queued_key(principal.name)
    try:
        bound = redis_client.scard(key) - 1  # -1: the marker
        if 0 <= bound < cap:
            return
        queued, ids = runs.queued_runs(principal, cap)
        with redis_client.pipeline() as pipe:  # MULTI: no submit sees the index half rebuilt
            pipe.delete(key)
            pipe.sadd(key, _PRESENT, *ids)
            pipe.expire(key, _INDEX_TTL_S)
            pipe.execute()
    except redis.RedisError as exc:  # the message could not be sent either: refuse before anything is created
        raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
    if queued >= cap:
        raise TooManyRequests(
            f"'{principal.name}' already has {queued} queued trials, studies or range tests (the cap is {cap}); wait for some to start",
            retry_after_s=30,
        )


def note_queued(redis_client: redis.Redis, owner: str, run_id: str) -> None:
    """Count ``run_id``, just accepted and sent, in ``owner``'s index (see :func:`check_queued_quota`); best effort.

    Called after the send, which met Redis a moment ago: a run whose message was not sent is not queued.
    """
    try:
        redis_client.sadd(queued_key(owner), run_id)
    except redis.RedisError:
        log.warning("run %s is not in %s's queued index (Redis failed just after its message was sent); counted at the next rebuild", run_id, owner)


def check_study_caps(n_trials: int | None, parallelism: int | None, settings: ApiSettings) -> None:
    """Raise 422 naming the field when a study asks for more trials or parallelism than allowed."""
    errors = []
    if n_trials is not None and n_trials > settings.max_trials_per_study:
        errors.append(FieldError(field="n_trials", message=f"at most {settings.max_trials_per_study} trials per study are allowed on this service"))
    if parallelism is not None and parallelism > settings.max_parallelism:
        errors.append(FieldError(field="parallelism", message=f"at most {settings.max_parallelism} trials of a study may run at once on this service"))
    if errors:
        raise InvalidSpec("; ".join(e.message for e in errors), errors=errors)
