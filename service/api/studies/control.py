"""Changing a running study: cancel it, or extend it with more trials and warm-start points."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from pydantic import ValidationError

from models.spec.space import grid_points
from models.spec.study import StudySpec
from models.store import runs
from models.store.keys import cancel_key, lease_key
from models.store.runs import TAG, TERMINAL_STATUSES
from models.store.search import USER_ATTR, encode_params, fail_trial
from models.store.share import Route
from models.store.teams import team_of
from service.api.errors import Conflict, FieldError, InvalidSpec, ServiceUnavailable
from service.api.studies.accept import send_steps
from service.api.studies.records import StudyRecord, StudyStore
from service.api.wiring import Services

__all__ = ["cancel_study", "extend_study"]


def cancel_study(s: Services, store: StudyStore, record: StudyRecord) -> None:
    """Start no more trials and raise the cancel flag of each running one; end now what no worker holds.

    A study with a trial a worker trains (its lease alive) ends when that step ends, as usual. A
    queued study, and one whose running trials lost their workers, ends ``cancelled`` here, its
    orphaned trials with it: no step may ever come to end them. A step that comes later sees the
    study stopped and its trial ended, and only gives its slot back.
    """
    if record.terminal:
        raise Conflict(f"study {record.id} has already ended ({record.state}); there is nothing to cancel")
    budget = store.budget(record.id)
    orphans: list[Any] = []
    try:
        budget.stop("cancelled")
        live = bool(s.redis.exists(lease_key(f"{record.id}-lr-auto")))
        if record.study is not None:
            record.study.set_user_attr(USER_ATTR.STOPPED, json.dumps({"why": "cancelled", "reason": "cancelled on request"}))
            for trial in record.study.get_trials(deepcopy=False):
                trial_id = trial.user_attrs.get(USER_ATTR.TRIAL_ID)
                if trial.state.name == "RUNNING" and trial_id:
                    s.redis.set(cancel_key(trial_id), "1", ex=s.settings.visibility_timeout_s * 2)
                    if s.redis.exists(lease_key(trial_id)):
                        live = True
                    else:
                        orphans.append(trial)
        in_flight = int(budget.state().get("inflight", "0"))
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
    for trial in orphans:
        _cancel_orphan(s, store, record, trial)
    if in_flight <= 0 or not live:
        # No step will come to end it: nothing was in flight, no worker holds any of it, or Redis lost the counters.
        s.runs.end(record.id, "KILLED", "cancelled", "cancelled on request")


def _cancel_orphan(s: Services, store: StudyStore, record: StudyRecord, trial: Any) -> None:
    """End a running trial of the study that no worker holds (RUNNING in MLflow, no lease): MLflow and Optuna."""
    trial_id = trial.user_attrs[USER_ATTR.TRIAL_ID]
    with s.runs.translated(trial_id):
        status = s.runs.client.get_run(trial_id).info.status
    if status != "RUNNING":
        return  # SCHEDULED: its step is about to start it and will see the cancel flag; or it has ended
    reason = "the study was cancelled on request; no worker held this trial"
    s.runs.end(trial_id, "KILLED", "cancelled", reason)
    with store.storage_errors():
        fail_trial(record.study, trial.number, "cancelled", reason)


def extend_study(s: Services, store: StudyStore, record: StudyRecord, n_trials: int, warm_start: list[dict[str, Any]]) -> int:
    """Add trials (and warm-start points to try first); the number added."""
    if record.state in ("cancelled", "cancelling"):
        raise Conflict(f"study {record.id} was cancelled; start a new study instead of extending it")
    if record.study is None:
        raise ServiceUnavailable(f"study {record.id} is not in this service's study storage", retry_after_s=60)
    spec = _with_warm_start(record.spec, warm_start)
    added = max(n_trials, len(warm_start))
    if added == 0:
        _refuse("n_trials", "give n_trials > 0 or warm_start configurations")
    study = record.study
    if spec.sampler.name == "grid":
        waiting = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING")
        remaining = len(grid_points(spec)) - int(study.user_attrs[USER_ATTR.BUDGET]) + len(warm_start)
        if added > max(waiting, 0) + max(remaining, 0):
            _refuse("n_trials", f"the grid has {max(remaining, 0)} points left to run; add warm_start configurations for more")
    budget = store.budget(record.id)
    try:
        counted = budget.exists()  # Redis answers before anything changes: a 503 here leaves the study as it was
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
    with store.storage_errors():
        for point in warm_start:
            study.enqueue_trial(encode_params(spec, point), skip_if_exists=True)
        if spec.sampler.name == "grid":
            start = int(study.user_attrs[USER_ATTR.BUDGET])  # the points past the budget were not enqueued yet
            for point in grid_points(spec)[start : start + max(0, added - len(warm_start))]:
                study.enqueue_trial(encode_params(spec, point), skip_if_exists=True)
        new_budget = int(study.user_attrs[USER_ATTR.BUDGET]) + added
        study.set_user_attr(USER_ATTR.BUDGET, new_budget)
        study.set_user_attr(USER_ATTR.STARTED_AT, time.time())  # a timeout counts from the extension
        study.set_user_attr(USER_ATTR.STOPPED, "{}")
    queue = study.user_attrs[USER_ATTR.QUEUE]
    try:
        if not counted or budget.add(added) < 0:  # lost, before or since the check: rebuilt whole, never in part
            started = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING")
            budget.open(new_budget, spec.parallelism, claimed=started)
        with s.runs.translated(record.id, "study"):
            # The budget is raised before the run's status is read again: a study whose last step was
            # ending it meanwhile is either seen ended here and reopened, or sees the raised budget
            # and reopens itself (workers.study.report.finish_study).
            if record.terminal or s.runs.client.get_run(record.id).info.status in TERMINAL_STATUSES:
                runs.reopen_run(s.runs.client, record.id, {TAG.N_TRIALS: str(new_budget)})
            else:
                s.runs.client.set_tag(record.id, TAG.N_TRIALS, str(new_budget))
        send_steps(s, record.id, budget.top_up().slots, Route(queue, team_of(record.tags), spec.priority))
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
    return added


def _with_warm_start(spec: StudySpec, warm_start: list[dict[str, Any]]) -> StudySpec:
    if not warm_start:
        return spec
    try:
        return StudySpec.model_validate({**spec.model_dump(mode="json"), "warm_start": warm_start})
    except ValidationError as exc:
        raise InvalidSpec.from_validation_error(exc) from exc


def _refuse(field: str, message: str) -> None:
    raise InvalidSpec(message, errors=[FieldError(field=field, message=message)])
