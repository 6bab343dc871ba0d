"""Compute quotas, checked at submit before anything is created: a team's device-seconds a day and queued.

A team's quotas are its ``TeamPolicy`` in ``CONVTUNE_TEAMS`` (``device_seconds_per_day``,
``queued_device_seconds``; none by default, and none with authentication off). A submit is
estimated in device-seconds (:func:`models.store.usage.estimate_trial`, per the team's ``estimate``:
training FLOPs over the queue's measured throughput, or the trial's time limit; a study's is its
budget times one trial's), then held against the team's use in the usage table
(:meth:`models.store.usage.UsageStore.quota_use`): what ended in the last 24 h plus the estimates of
what it has accepted and not ended. Over a limit, a 429 (:class:`service.api.errors.QuotaExceeded`)
naming the team, the limit, the use, the estimate and when it frees up; nothing is created. Running
work is never stopped by a quota.

Accepted work is recorded open in the usage table at its estimate (:meth:`Reservation.open`, called
by :func:`service.api.accept.accept_run` once the run exists and before its message is sent), and
closed by the worker that ends it (or by the API when it ends the run itself). Work ended by
something else (the reconciler) may leave a row open: before refusing, the API asks MLflow about the
team's open rows and closes those whose runs have ended, so a stale estimate never refuses a submit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from sqlalchemy.exc import SQLAlchemyError

from models.spec.plan import NetworkPlan
from models.spec.trial import TrialSpec
from models.store.runs import TERMINAL_STATUSES
from models.store.usage import QuotaRefusal, UsageStore, check_quota, estimate_trial, open_usage, throughputs
from service.api.auth import Principal
from service.api.errors import QuotaExceeded, ServiceUnavailable
from service.api.wiring import Services

__all__ = ["Reservation", "check_compute_quota"]

log = logging.getLogger(__name__)
_VERIFY_MAX = 500  # open rows asked of MLflow before a refusal, at most


@dataclass
class Reservation:
    """A submit that passed its quotas: its estimate, to record open in the usage table once its run exists."""

    study_storage: str
    team: str | None
    kind: str
    queue: str
    estimate: float
    how: str

    def open(self, run_id: str) -> None:
        """Record ``run_id`` accepted and not ended, at the estimate; best effort (logged: the run goes ahead)."""
        try:
            open_usage(self.study_storage).reserve(run_id, self.team, self.kind, self.queue, self.estimate)
        except SQLAlchemyError as exc:
            log.warning("run %s: its estimate is not in the usage table (%s); its quota counts it once it ends", run_id, str(exc)[:300])


def check_compute_quota(
    s: Services, principal: Principal, kind: str, queue: str, spec: TrialSpec, plan: NetworkPlan | None, trials: int = 1,
) -> Reservation:
    """Estimate a submit of ``trials`` trials of ``spec`` on ``queue`` and hold it against the team's quotas.

    Raises QuotaExceeded (429) when it is over one, ServiceUnavailable when the usage table or Redis
    does not answer for a team that has a quota. The reservation to open once the run exists.
    """
    policy = s.settings.teams.get(principal.team) if principal.team is not None else None
    how = policy.estimate if policy is not None else "flops"
    has_quota = policy is not None and (policy.device_seconds_per_day is not None or policy.queued_device_seconds is not None)
    try:
        rate, per_trial = throughputs(s.redis, [queue])[queue]
    except redis.RedisError as exc:
        if has_quota:
            raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
        rate, per_trial = None, None  # no quota to hold it against: the estimate goes without a measured throughput (the send says if Redis is down)
    one, how_estimated = estimate_trial(spec, plan.flops if plan else None, rate, per_trial, how)
    reservation = Reservation(s.settings.study_storage, principal.team, kind, queue, one * trials, how_estimated)
    if not has_quota:
        return reservation
    try:
        store = open_usage(s.settings.study_storage)
        refusal = _refusal(store, principal.team, reservation.estimate, policy)
        if refusal is not None and _close_ended(s, store, principal.team):
            refusal = _refusal(store, principal.team, reservation.estimate, policy)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"the usage table did not answer: {str(exc)[:300]}") from exc
    if refusal is not None:
        raise QuotaExceeded(_detail(principal.team, refusal, how_estimated), team=principal.team, refusal=refusal)
    return reservation


def _refusal(store: UsageStore, team: str | None, estimate: float, policy) -> QuotaRefusal | None:
    return check_quota(
        store.quota_use(team), estimate, device_seconds_per_day=policy.device_seconds_per_day, queued_device_seconds=policy.queued_device_seconds,
    )


def _close_ended(s: Services, store: UsageStore, team: str | None) -> int:
    """Close ``team``'s open rows whose runs have ended in MLflow (or are gone); how many were closed."""
    from mlflow.exceptions import MlflowException

    open_ids = store.open_runs(team)[:_VERIFY_MAX]
    if not open_ids:
        return 0
    try:
        experiment_id = s.runs.experiment_id(team)
        found = {}
        for i in range(0, len(open_ids), 100):
            ids = ", ".join(f"'{r}'" for r in open_ids[i : i + 100])
            for run in s.runs.client.search_runs([experiment_id], filter_string=f"attributes.run_id IN ({ids})", max_results=100):
                found[run.info.run_id] = run.info
    except (MlflowException, OSError) as exc:
        log.warning("open usage rows of team %s not checked against MLflow: %s", team, str(exc)[:300])
        return 0
    closed = 0
    for run_id in open_ids:
        info = found.get(run_id)
        if info is None or info.status in TERMINAL_STATUSES:
            ended = (info.end_time / 1000) if info is not None and info.end_time else time.time()
            closed += store.close(run_id, ended)
    return closed


def _detail(team: str | None, refusal: QuotaRefusal, how: str) -> str:
    what = "device-seconds a day (rolling 24 h)" if refusal.quota == "device_seconds_per_day" else "queued device-seconds"
    when = (
        f"it frees up in about {refusal.retry_after_s} s" if refusal.frees_at is not None
        else "this submit alone is over the limit: make it smaller or ask for a larger quota"
    )
    return (
        f"team '{team}' is over its compute quota {refusal.quota}: {refusal.limit:g} {what}; it uses {refusal.used:.1f} and this submit "
        f"is estimated at {refusal.estimate:.1f} ({how}); {when}"
    )
