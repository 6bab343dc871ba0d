"""/studies: submit a search over trial specs, follow it, list its trials, cancel or extend it."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from flask import current_app, url_for
from flask_openapi3 import APIBlueprint, Tag

from models.logs import bind
from models.spec.outcomes import UnknownOutcome, outcome
from models.spec.study import StudySpec
from models.store.runs import TAG
from models.store.search import TRIAL_STATES, USER_ATTR, chosen, decode_params, front, storage_kind, trial_label
from service.api.auth import check_owner, current_principal, redacted
from service.api.errors import NotFound
from service.api.idempotency import IdempotencyHeader, idempotent
from service.api.limits import check_study_caps
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.schemas import page_offset, page_token
from service.api.studies import control
from service.api.studies.accept import accept_study
from service.api.studies.records import StudyRecord, StudyStore
from service.api.studies.schemas import (
    RegisteredModel,
    StudyAccepted,
    StudyBest,
    StudyExtend,
    StudyFrontTrial,
    StudyList,
    StudyListQuery,
    StudyPath,
    StudyProgress,
    StudyPublic,
    StudyTrial,
    StudyTrialList,
    StudyTrialQuery,
)
from service.api.wiring import services

__all__ = ["bp", "study_store"]

bp = APIBlueprint(
    "studies", __name__, url_prefix="/studies", abp_tags=[Tag(name="studies")], abp_security=BEARER, abp_responses=PROTECTED_ERRORS,
)


def study_store() -> StudyStore:
    """The current app's study store, built on first use from its collaborators."""
    built = current_app.extensions.get("convtune.studies")
    if built is None:
        s = services()
        built = current_app.extensions["convtune.studies"] = StudyStore(s.settings, s.runs, s.redis)
    return built


@bp.post("", responses={202: StudyAccepted, **problems(400, 409, 413, 415, 503)})
@idempotent
def create_study(body: StudySpec, header: IdempotencyHeader):
    """Submit a study: validated, recorded (MLflow parent run, Optuna study), first trials queued."""
    s = services()
    principal = current_principal()
    check_study_caps(body.budget, body.parallelism, s.settings)
    study_id = accept_study(s, study_store(), body, principal)
    bind(study_id=study_id)
    url = url_for("studies.get_study", study_id=study_id, _external=True)
    answer = StudyAccepted(
        id=study_id, state="queued", name=body.display_name(), n_trials=body.budget, parallelism=body.parallelism,
        queue=body.base.queue or s.settings.default_queue, storage=storage_kind(s.settings.study_storage), url=url,
        trials_url=url_for("studies.list_study_trials", study_id=study_id, _external=True), mlflow_url=s.runs.run_url(s.settings.ui_url, s.runs.experiment_id(principal.team), study_id),
    )
    return answer.model_dump(), 202, {"Location": url}


@bp.get("", responses={200: StudyList, **problems(400, 503)})
def list_studies(query: StudyListQuery):
    """List the studies this token's team may read, newest first, a page at a time; filter by state, team, owner, tag and time."""
    records, token = study_store().search(current_principal(), max_results=query.limit, page_token=query.page_token, status=query.status, filters=query)
    return StudyList(items=[study_public(r, with_model=False) for r in records], next_page_token=token or None).model_dump()


@bp.get("/<study_id>", responses={200: StudyPublic, **problems(404, 503)})
def get_study(path: StudyPath):
    """Show a study: state, trials per outcome, progress, the chosen trial and (several objectives) the Pareto front."""
    return study_public(study_store().get(path.study_id)).model_dump()


@bp.get("/<study_id>/trials", responses={200: StudyTrialList, **problems(404, 503)})
def list_study_trials(path: StudyPath, query: StudyTrialQuery):
    """List a study's trials in the order they started, with params, outcome, value and epochs."""
    record = study_store().get(path.study_id)
    trials = [
        t for t in (record.study.get_trials(deepcopy=False) if record.study else [])
        if (query.state is None or TRIAL_STATES.get(t.state.name) == query.state) and (query.status is None or trial_status(t) == query.status)
    ]
    start = page_offset(query.page_token) if query.page_token else query.offset
    page = trials[start : start + query.limit]
    more = start + query.limit < len(trials)
    return StudyTrialList(items=[_trial(record, t) for t in page], total=len(trials), next_page_token=page_token(start + query.limit) if more else None).model_dump()


def trial_status(t: Any) -> str:
    """A study trial's status in the words of /trials: from its outcome once it has one, else from Optuna's state."""
    ended = t.user_attrs.get(USER_ATTR.OUTCOME)
    if ended:
        try:
            return outcome(ended).client_status
        except UnknownOutcome:
            pass
    return {"RUNNING": "running", "WAITING": "queued", "COMPLETE": "succeeded", "PRUNED": "pruned"}.get(t.state.name, "failed")


@bp.post("/<study_id>/cancel", responses={202: StudyPublic, **problems(404, 409, 503)})
def cancel_study(path: StudyPath):
    """Cancel a study: no more trials start, running ones stop at their next check."""
    store = study_store()
    record = store.get(path.study_id)
    check_owner(record.tags, f"study {record.id}")
    control.cancel_study(services(), store, record)
    return study_public(store.get(path.study_id)).model_dump(), 202


@bp.post("/<study_id>/extend", responses={202: StudyPublic, **problems(404, 409, 503)})
@idempotent
def extend_study(path: StudyPath, body: StudyExtend, header: IdempotencyHeader):
    """Add trials to a running or ended study, trying the given warm-start configurations first."""
    store = study_store()
    record = store.get(path.study_id)
    check_owner(record.tags, f"study {record.id}")
    budget = int(record.study.user_attrs.get(USER_ATTR.BUDGET, record.spec.budget)) if record.study else record.spec.budget
    check_study_caps(budget + max(body.n_trials, len(body.warm_start)), None, services().settings)  # the budget now, extensions included
    control.extend_study(services(), store, record, body.n_trials, body.warm_start)
    return study_public(store.get(path.study_id)).model_dump(), 202


def study_public(record: StudyRecord, with_model: bool = True) -> StudyPublic:
    """A study record as the API shows it."""
    s = services()
    trials = record.study.get_trials(deepcopy=False) if record.study else []
    counts: dict[str, int] = {}
    for t in trials:
        key = "running" if t.state.name == "RUNNING" else "waiting" if t.state.name == "WAITING" else t.user_attrs.get(USER_ATTR.OUTCOME, TRIAL_STATES.get(t.state.name, "other"))
        counts[key] = counts.get(key, 0) + 1
    budget = int(record.study.user_attrs.get(USER_ATTR.BUDGET, record.spec.budget)) if record.study else record.spec.budget
    finished = sum(1 for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL"))
    started_at = record.study.user_attrs.get(USER_ATTR.STARTED_AT) if record.study else None
    end_s = record.end_ms / 1000 if record.terminal and record.end_ms else time.time()
    progress = StudyProgress(
        finished=finished, running=counts.get("running", 0), n_trials=budget, fraction=round(min(finished / budget, 1.0), 4) if budget else 1.0,
        epochs_trained=sum(int(t.user_attrs.get(USER_ATTR.EPOCHS, 0)) for t in trials),
        elapsed_s=round(end_s - float(started_at), 3) if started_at else None, timeout_s=record.spec.timeout_s, stopped=record.stopped or None,
    )
    tags = record.tags
    registered = None
    if tags.get(TAG.REGISTERED_MODEL):
        registered = RegisteredModel(name=tags[TAG.REGISTERED_MODEL], version=tags[TAG.REGISTERED_VERSION], alias=tags[TAG.REGISTERED_ALIAS])
    url = url_for("studies.get_study", study_id=record.id, _external=True)
    return StudyPublic(
        id=record.id, name=tags.get(TAG.RUN_NAME), state=record.state, reason=tags.get(TAG.REASON),
        objective=_goal(record.spec.primary), objectives=[_goal(g) for g in record.spec.goals], constraints=[str(c) for c in record.spec.constraints],
        sampler=record.spec.sampler.name, pruner=record.spec.pruner.name, parallelism=record.spec.parallelism, queue=tags.get(TAG.QUEUE),
        counts=counts, diverged_lrs=_diverged_lrs(record, trials), progress=progress, best=_best(record, with_model), front=_front(record), registered_model=registered,
        timings={"created_at": _iso(record.start_ms), "ended_at": _iso(record.end_ms) if record.terminal else None},
        spec=redacted(record.spec.model_dump(mode="json"), tags), url=url, trials_url=url_for("studies.list_study_trials", study_id=record.id, _external=True),
        mlflow_url=s.runs.run_url(s.settings.ui_url, record.experiment_id, record.id),
    )


def _diverged_lrs(record: StudyRecord, trials: list[Any]) -> list[float]:
    """The LR each diverged trial trained at: its sampled optim.lr, else the base's."""
    lrs = [float(t.params.get("optim.lr", record.spec.base.optim.lr)) for t in trials if t.user_attrs.get(USER_ATTR.OUTCOME) == "diverged"]
    return sorted(lrs)


def _goal(goal: Any) -> dict[str, str]:
    return {"metric": goal.metric, "direction": goal.resolved_direction, "value": goal.value}


def _best(record: StudyRecord, with_model: bool = True) -> StudyBest | None:
    """The trial the spec's rule chooses among those within the budgets (a duplicate never: its twin trained);
    ``with_model`` reads its run for its model's URI (one more MLflow call: not for every study of a list)."""
    best = chosen(record.study, record.spec) if record.study is not None else None
    if best is None:
        return None
    s = services()
    trial_id = best.user_attrs.get(USER_ATTR.TRIAL_ID)
    return StudyBest(
        number=best.number, trial_id=trial_id, value=float(best.values[0]), values=_values(record, best.values),
        rule=record.spec.selection_rule, params=decode_params(record.spec, best.params),
        mlflow_url=s.runs.run_url(s.settings.ui_url, record.experiment_id, trial_id) if trial_id else None,
        model_uri=_model_uri(trial_id) if trial_id and with_model else None,
    )


def _model_uri(trial_id: str) -> str | None:
    """The trial's logged model, named by its run's tags; None while it has none (or its run is gone)."""
    try:
        return services().runs.get(trial_id).model_uri
    except NotFound:
        return None


def _front(record: StudyRecord) -> list[StudyFrontTrial]:
    if record.study is None or not record.spec.multi_objective:
        return []
    s = services()
    trials = record.study.get_trials(deepcopy=False)
    out = []
    for point in front(record.study, record.spec):
        trial_id = trials[point.number].user_attrs.get(USER_ATTR.TRIAL_ID)
        out.append(StudyFrontTrial(
            number=point.number, trial_id=trial_id, values=_values(record, point.values), params=decode_params(record.spec, trials[point.number].params),
            mlflow_url=s.runs.run_url(s.settings.ui_url, record.experiment_id, trial_id) if trial_id else None,
        ))
    return out


def _values(record: StudyRecord, values: Any) -> dict[str, float]:
    return {g.metric: float(v) for g, v in zip(record.spec.goals, values, strict=True)}


def _trial(record: StudyRecord, t: Any) -> StudyTrial:
    s = services()
    trial_id = t.user_attrs.get(USER_ATTR.TRIAL_ID)
    return StudyTrial(
        number=t.number, trial_id=trial_id, name=None if trial_id is None else _trial_name(record, t), status=trial_status(t),
        state=TRIAL_STATES.get(t.state.name, t.state.name.lower()),
        outcome=t.user_attrs.get(USER_ATTR.OUTCOME), reason=t.user_attrs.get(USER_ATTR.REASON), value=t.values[0] if t.values else None,
        values=_values(record, t.values) if t.values and record.spec.multi_objective else None, over_budget=t.user_attrs.get(USER_ATTR.OVER_BUDGET),
        params=decode_params(record.spec, t.params), epochs=int(t.user_attrs.get(USER_ATTR.EPOCHS, 0)), duplicate_of=t.user_attrs.get(USER_ATTR.DUPLICATE_OF),
        started_at=t.datetime_start.astimezone(timezone.utc).isoformat() if t.datetime_start else None,
        duration_s=t.duration.total_seconds() if t.duration else None,
        mlflow_url=s.runs.run_url(s.settings.ui_url, record.experiment_id, trial_id) if trial_id else None,
    )


def _trial_name(record: StudyRecord, t: Any) -> str:
    return f"{trial_label(decode_params(record.spec, t.params))} #{t.number}"


def _iso(ms: int | None) -> str | None:
    return None if not ms else datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()
