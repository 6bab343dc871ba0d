"""The end of a study: its parent run gets the chosen trial, the plots, the tables, and a registered model.

Called by the step that leaves nothing in flight (see :mod:`workers.study.step`). The *chosen* trial is
the one the spec's rule picks among the trials that met every budget (``register_as``'s rule, else the
best by the objective, or the knee of a two-objective front: :func:`models.store.search.chosen`).
The parent run gets:

- metrics ``best_<metric>`` (per objective), ``best_trial_number``, ``trials_<outcome>`` counts and
  ``epochs_trained``; the tag ``convtune.selection`` says which rule chose the trial;
- with several objectives, ``study/pareto_front.json`` (a table: each front trial's values, params
  and run) and ``plots/pareto_front.svg`` (every trained trial, the front and the chosen one);
- params ``best.<path>`` when the study first ends (MLflow params are immutable; after ``/extend``
  the tags ``convtune.best.<path>``, the metric and ``study/best.json`` follow the new best);
- ``plots/optimization_history.svg``, ``plots/param_importances.svg``, ``plots/parallel_coordinate.svg``
  and ``plots/intermediate_values.svg`` (:mod:`workers.study.figures`, on the first objective; the
  last two when there is something to draw), ``study/trials.json`` (a table the MLflow UI shows) and
  ``study/param_importances.json``;
- with ``register_as``, the best trial's model as a new version of that registered model, aliased.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from typing import Any

import optuna
import redis
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from models.spec.objectives import SIZE_MEASURES
from models.spec.study import StudySpec
from models.store import runs
from models.store.access import AccessNotGranted, TeamAccess
from models.store.budget import StudyBudget
from models.store.claims import SEAL_TAG, ClaimRefused, open_claims, registered_model
from models.store.events import ENDED, EventLog
from models.store.keys import study_key
from models.store.runs import TAG, study_state
from models.store.search import TRIAL_STATES, USER_ATTR, candidates, chosen, decode_params, front
from models.store.teams import callback_team
from models.store.usage import open_usage
from workers.callbacks.announce import announce_study_end
from workers.runtime import WorkerRuntime
from workers.study.figures import (
    Axis, intermediate_values_svg, optimization_history_svg, parallel_coordinate_svg, param_importances_svg, pareto_front_svg,
)
from workers.study.recovery import ended_run, fail_unstarted, tell_ended
from workers.training.outcomes import Ending
from workers.trial.lease import release_held
from workers.trial.tracking import Uploads

__all__ = ["finish_study", "trial_rows"]

log = logging.getLogger(__name__)


# How long a process may take to record a study's results before another may do it instead (it died).
FINISH_TTL_S = 600


def finish_study(study_id: str, rt: WorkerRuntime, stored: optuna.Study, spec: StudySpec, stopped: str) -> None:
    """End the study's parent run with its results, unless another process is doing it now.

    The step that leaves nothing in flight and the reconciler (which finishes what such a step left)
    may both come to a study: one at a time records it (a Redis key, :data:`FINISH_TTL_S` at most),
    so a slow ending is never done twice (two model versions, the alias moved twice, two callbacks).
    With Redis unreachable, it goes on without the key, as it did before there was one.
    """
    key, token = f"{study_key(study_id)}:finishing", uuid.uuid4().hex
    try:
        if not rt.redis.set(key, token, nx=True, ex=FINISH_TTL_S):
            log.info("study %s: another process is recording its results; left to it", study_id)
            return
    except redis.RedisError as exc:
        log.warning("study %s: finishing without the key that keeps it to one process (%s)", study_id, exc)
    try:
        _finish_study(study_id, rt, stored, spec, stopped)
    finally:
        try:
            release_held(rt.redis, key, token)  # only this process's: another may have taken it after FINISH_TTL_S
        except redis.RedisError:
            pass  # it expires


def _finish_study(study_id: str, rt: WorkerRuntime, stored: optuna.Study, spec: StudySpec, stopped: str) -> None:
    """Record the study's results and end its parent run; every part is best-effort except the ending itself."""
    _settle_orphans(rt, stored, spec)
    trials = stored.get_trials(deepcopy=False)
    counts = Counter(t.user_attrs.get(USER_ATTR.OUTCOME, TRIAL_STATES.get(t.state.name, "other")) for t in trials if t.state != TrialState.WAITING)
    best = chosen(stored, spec)
    now = int(time.time() * 1000)
    epochs = sum(int(t.user_attrs.get(USER_ATTR.EPOCHS, 0)) for t in trials)
    metrics = [Metric(f"trials_{outcome}", n, now, 0) for outcome, n in counts.items()]
    metrics += [Metric("trials_total", sum(counts.values()), now, 0), Metric("epochs_trained", epochs, now, 0)]
    tags = [RunTag(TAG.TRIAL_COUNTS, json.dumps(dict(counts))), RunTag(TAG.SELECTION, spec.selection_rule)]
    if best is not None:
        metrics += [Metric(f"best_{g.metric}", v, now, 0) for g, v in zip(spec.goals, best.values, strict=True)]
        metrics.append(Metric("best_trial_number", best.number, now, 0))
        best_params = decode_params(spec, best.params)
        tags += [RunTag(TAG.BEST_TRIAL_ID, best.user_attrs.get(USER_ATTR.TRIAL_ID, "")), RunTag(TAG.BEST_TRIAL_NUMBER, str(best.number))]
        tags += [RunTag(f"{TAG.BEST_PREFIX}{k}", json.dumps(v)) for k, v in best_params.items()]
    used, kinds = _study_usage(rt, study_id)
    metrics += [Metric(key, value, now, 0) for key, value in used.items()]
    tags += [RunTag(TAG.DEVICE_KIND, ",".join(kinds))] if kinds else []
    rt.mlflow.log_batch(study_id, metrics=metrics, tags=tags)
    if best is not None:
        _log_best_params(rt, study_id, decode_params(spec, best.params))
        rt.mlflow.log_dict(study_id, {**_best_info(spec, best), "rule": spec.selection_rule}, "study/best.json")
    _log_artifacts(rt, study_id, stored, spec)
    cancelled = _cancelled(rt, study_id, stored, stopped)  # a cancelled study registers nothing
    registered = _register(rt, study_id, spec, best) if best is not None and spec.register_as and not cancelled else None

    if cancelled:
        ending = Ending("KILLED", "cancelled", "cancelled on request")
    elif best is None:
        within = " within its budgets" if spec.constraints or (spec.register_as and spec.register_as.where) else ""
        ending = Ending("FAILED", "error", f"no trial completed{within} ({_count_text(counts)})")
    else:
        shown = ", ".join(f"{g.metric} {_shown(v)}" for g, v in zip(spec.goals, best.values, strict=True))
        chose = f"best {shown}" if spec.selection is None and not spec.multi_objective else f"{spec.selection_rule}: {shown}"
        reason = f"{sum(counts.values())} trials ({_count_text(counts)}); {chose} by trial #{best.number}"
        if spec.multi_objective:
            reason += f"; {len(front(stored, spec))} trials on the Pareto front"
        if stopped in ("target", "timeout"):
            reason += f"; stopped early: {json.loads(stored.user_attrs.get(USER_ATTR.STOPPED, '{}')).get('reason', stopped)}"
        ending = Ending("FINISHED", "succeeded", reason)
    if registered:
        ending = Ending(ending.mlflow_status, ending.outcome, f"{ending.reason}; registered as {registered}")
    budget = StudyBudget(rt.redis, study_id)
    if _extended(budget):
        log.info("study %s was extended while its results were recorded; the step that ends its new trials ends it", study_id)
        return
    team = callback_team(rt.mlflow.get_run(study_id).data.tags) if spec.callback_url else None  # before it ends: a failure here is retried
    runs.end_run(rt.mlflow, study_id, ending.mlflow_status, ending.outcome, ending.reason)
    if _extended(budget):
        # An extension (service.api.studies.control.extend_study) raises the budget, then reads the run's
        # status: either it saw the run ended and reopens it, or this sees its budget and reopens it.
        runs.reopen_run(rt.mlflow, study_id)
        log.info("study %s was extended as it ended: reopened for its new trials", study_id)
        return
    log.info("study %s ended %s: %s", study_id, ending.outcome, ending.reason)
    EventLog(rt.redis).publish(study_id, ENDED, {"state": study_state(ending.mlflow_status), "outcome": ending.outcome, "reason": ending.reason})
    _close_usage(rt, study_id)
    best_info = None if best is None else _best_info(spec, best)
    announce_study_end(
        study_id, str(spec.callback_url) if spec.callback_url else None, team=team, name=spec.display_name(), ending=ending, best=best_info,
        counts=dict(counts),
    )


def _study_usage(rt: WorkerRuntime, study_id: str) -> tuple[dict[str, float], list[str]]:
    """The sum of what the study's runs used (their rows in the usage table), and their device kinds; nothing when the table fails."""
    try:
        return open_usage(rt.settings.study_storage).study_totals(study_id)
    except Exception as exc:  # noqa: BLE001 - accounting never fails a study's ending
        log.warning("study %s: its usage was not summed: %s: %s", study_id, type(exc).__name__, str(exc)[:300])
        return {}, []


def _close_usage(rt: WorkerRuntime, study_id: str) -> None:
    """Close the study's own row in the usage table: its estimate stops counting against the team's quotas."""
    try:
        open_usage(rt.settings.study_storage).close(study_id)
    except Exception as exc:  # noqa: BLE001 - closed when the team's quota is next checked
        log.warning("study %s: its usage row was not closed: %s: %s", study_id, type(exc).__name__, str(exc)[:300])


def _cancelled(rt: WorkerRuntime, study_id: str, stored: optuna.Study, stopped: str) -> bool:
    """Whether the study was cancelled: as the step saw it, as the study records it, or since (a cancel while its results were recorded)."""
    try:
        recorded = json.loads(stored.user_attrs.get(USER_ATTR.STOPPED) or "{}").get("why")
    except (ValueError, AttributeError):
        recorded = None
    if "cancelled" in (stopped, recorded):
        return True
    try:
        return StudyBudget(rt.redis, study_id).stopped() == "cancelled"
    except redis.RedisError:
        return False  # a cancel records itself in the study too (service.api.studies.control.cancel_study), read above


def _extended(budget: StudyBudget) -> bool:
    """Whether an extension gave the study more trials after its last step released its slot (more budget, or new steps in flight)."""
    state = budget.state()
    more = int(state.get("budget", 0)) > int(state.get("claimed", 0)) or int(state.get("inflight", 0)) > 0
    return more and not state.get("stopped")


def _best_info(spec: StudySpec, best: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "trial_id": best.user_attrs.get(USER_ATTR.TRIAL_ID), "number": best.number, "value": float(best.values[0]),
        "values": {g.metric: float(v) for g, v in zip(spec.goals, best.values, strict=True)}, "params": decode_params(spec, best.params),
    }


def _shown(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _count_text(counts: Counter) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in counts.most_common()) or "none ran"


def _settle_orphans(rt: WorkerRuntime, stored: optuna.Study, spec: StudySpec) -> None:
    """Nothing is in flight, yet Optuna has trials RUNNING: tell it how each ended.

    One whose MLflow run ended (its step died, or the study storage failed, before Optuna was told)
    gets the state and values of that run, the record; the others lost their worker before they
    trained, or while they did, and nothing resumes them now: ``worker_lost``.
    """
    for t in stored.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = t.user_attrs.get(USER_ATTR.TRIAL_ID)
        run = ended_run(rt, trial_id) if trial_id else None
        if run is not None:
            tell_ended(rt, stored, spec, t.number, run)
        else:
            fail_unstarted(stored, t, "its worker was lost and nothing resumed the trial before its study ended", requeue=False)


def _log_best_params(rt: WorkerRuntime, study_id: str, params: dict[str, Any]) -> None:
    existing = rt.mlflow.get_run(study_id).data.params
    if any(k.startswith("best.") for k in existing):
        return  # logged when the study first ended; the tags and best.json carry the current best
    values = [Param(f"best.{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    rt.mlflow.log_batch(study_id, params=values)


def trial_rows(stored: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """One JSON-ready row per started trial: number, run id, state, outcome, value, epochs, params."""
    rows = []
    for t in stored.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        row = {
            "number": t.number, "trial_id": t.user_attrs.get(USER_ATTR.TRIAL_ID), "state": TRIAL_STATES.get(t.state.name, t.state.name.lower()),
            "outcome": t.user_attrs.get(USER_ATTR.OUTCOME), "value": t.values[0] if t.values else None, "epochs": t.user_attrs.get(USER_ATTR.EPOCHS, 0),
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        if spec.multi_objective:
            row.update({f"values.{g.metric}": v for g, v in zip(spec.goals, t.values or [None] * len(spec.goals), strict=True)})
        if spec.constraints:
            row["over_budget"] = "; ".join(t.user_attrs.get(USER_ATTR.OVER_BUDGET) or []) or None
        row.update({f"params.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in decode_params(spec, t.params).items()})
        rows.append(row)
    return rows


def _log_artifacts(rt: WorkerRuntime, study_id: str, stored: optuna.Study, spec: StudySpec) -> None:
    if spec.multi_objective:
        _log_front(rt, study_id, stored, spec)
    rows = trial_rows(stored, spec)
    if rows:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("params."), list(rows[0]).index(k) if k in rows[0] else 99, k))
        rt.mlflow.log_table(study_id, data={k: [r.get(k) for r in rows] for k in keys}, artifact_file="study/trials.json")
    importances: dict[str, float] | None = None
    try:
        importances = optuna.importance.get_param_importances(stored)
        rt.mlflow.log_dict(study_id, importances, "study/param_importances.json")
    except (ValueError, RuntimeError) as exc:
        log.info("study %s: no parameter importances: %s", study_id, exc)
    try:
        uploads = Uploads(rt.mlflow, study_id, rt.settings.artifacts_destination)
        for name, svg in _figures(stored, spec, importances).items():
            uploads.text(svg, f"plots/{name}.svg")
        uploads.wait()
    except Exception as exc:  # noqa: BLE001 - the figures are a bonus: the study's results are its metrics and tables
        log.warning("study %s: its figures were not logged: %s", study_id, exc)


def _figures(stored: optuna.Study, spec: StudySpec, importances: dict[str, float] | None) -> dict[str, str]:
    """The study's figures (:mod:`workers.study.figures`) on its first objective, each as SVG text."""
    goal = spec.goals[0]
    metric, maximize = goal.metric, goal.resolved_direction == "maximize"
    trials = [t for t in stored.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    axes: dict[str, Axis] = {}
    for t in complete:
        for name, dist in t.distributions.items():
            if name not in axes:
                choices = tuple(str(c) for c in dist.choices) if isinstance(dist, optuna.distributions.CategoricalDistribution) else None
                axes[name] = Axis(name, log=bool(getattr(dist, "log", False)), choices=choices)
    figures = {
        "optimization_history": optimization_history_svg([(t.number, t.values[0]) for t in complete], metric, maximize),
        "parallel_coordinate": parallel_coordinate_svg([(t.values[0], t.params) for t in complete], list(axes.values()), metric, maximize),
    }
    if importances:
        figures["param_importances"] = param_importances_svg(importances, metric)
    curves = [(t.number, sorted(t.intermediate_values.items()), t.state == TrialState.COMPLETE) for t in trials if t.intermediate_values]
    if curves:
        figures["intermediate_values"] = intermediate_values_svg(curves, metric)
    return figures


def _log_front(rt: WorkerRuntime, study_id: str, stored: optuna.Study, spec: StudySpec) -> None:
    """The Pareto front as a table (``study/pareto_front.json``) and a plot of its first two objectives (``plots/pareto_front.svg``)."""
    points = front(stored, spec)
    trials = stored.get_trials(deepcopy=False)
    rows = [
        {
            "number": c.number, "trial_id": trials[c.number].user_attrs.get(USER_ATTR.TRIAL_ID),
            **{g.metric: v for g, v in zip(spec.goals, c.values, strict=True)},
            **{f"params.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in decode_params(spec, trials[c.number].params).items()},
        }
        for c in points
    ]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        rt.mlflow.log_table(study_id, data={k: [r.get(k) for r in rows] for k in keys}, artifact_file="study/pareto_front.json")
    try:
        pick = chosen(stored, spec)
        svg = _front_svg(spec, candidates(stored, spec), points, None if pick is None else pick.number)
        rt.mlflow.log_text(study_id, svg, "plots/pareto_front.svg")
    except Exception as exc:  # noqa: BLE001 - a plot is a bonus, the table carries the front
        log.info("study %s: no pareto_front plot: %s", study_id, exc)


def _front_svg(spec: StudySpec, every: list[Any], points: list[Any], chosen_number: int | None) -> str:
    """Every trained trial, the front and the chosen trial on the first two objectives (:func:`workers.study.figures.pareto_front_svg`)."""
    # sizes span orders of magnitude: a log axis
    axes = [Axis(f"{g.metric} ({g.resolved_direction})", log=g.metric in SIZE_MEASURES) for g in spec.goals[:2]]
    trials = [(c.number, c.values[0], c.values[1], c.feasible) for c in every]
    return pareto_front_svg(trials, [c.number for c in points], chosen_number, *axes)


def _register(rt: WorkerRuntime, study_id: str, spec: StudySpec, best: optuna.trial.FrozenTrial) -> str | None:
    """Register the best trial's model into the model its team's claim on the name stands for; the version and alias, or None (and a tag saying why)."""
    import mlflow

    run_id = best.user_attrs.get(USER_ATTR.TRIAL_ID)
    assert spec.register_as is not None, "called only for a study that registers"
    name, alias = spec.register_as.name, spec.register_alias
    team = rt.mlflow.get_run(study_id).data.tags.get(TAG.TEAM)  # None with authentication off, as the API's claim
    try:
        _claimed_model(rt, study_id, name, team)
        # The trial's logged model (a raw-image classifier); a trial logged before those existed has only runs:/<id>/model.
        model_id = rt.mlflow.get_run(str(run_id)).data.tags.get(TAG.MODEL_ID)
        source = f"models:/{model_id}" if model_id else f"runs:/{run_id}/model"
        version = mlflow.register_model(source, name, tags={TAG.STUDY_ID: study_id, TAG.TRIAL_ID: str(run_id)})
        rt.mlflow.set_registered_model_alias(name, alias, version.version)
    except Exception as exc:  # noqa: BLE001 - not this team's name, no model logged (log_model off), registry unavailable
        log.warning("study %s: could not register trial %s's model as %s: %s", study_id, run_id, name, exc)
        rt.mlflow.set_tag(study_id, TAG.REGISTRATION_ERROR, str(exc)[:5000])
        return None
    _let_team_read(rt, study_id, team, name)
    shown = f"{name} version {version.version} (@{alias})"
    rt.mlflow.log_batch(study_id, tags=[RunTag(TAG.REGISTERED_MODEL, name), RunTag(TAG.REGISTERED_VERSION, str(version.version)), RunTag(TAG.REGISTERED_ALIAS, alias)])
    return shown


def _claimed_model(rt: WorkerRuntime, study_id: str, name: str, team: str | None) -> None:
    """Check that ``team`` holds the claim on ``name`` (:mod:`models.store.claims`, never MLflow's tags) and that the registered
    model of that name is the one the claim stands for, creating it under the claim (sealed) when there is none yet.

    Raises PermissionError when another team holds the name, or when a model of that name was made outside the claim.
    """

    claims = open_claims(rt.settings.study_storage)
    held = claims.holder(name)
    if held is None and registered_model(rt.mlflow, name) is not None:
        raise PermissionError(f"the registered model {name!r} exists but no team claimed its name; nothing is registered into it")
    try:
        claim = held or claims.claim(name, team, study_id)[0]  # claimed at submit; a study accepted before claims existed claims it now
    except ClaimRefused as exc:
        raise PermissionError(str(exc)) from exc
    if claim.team != team:
        raise PermissionError(f"the registered model name {name!r} is claimed by another team")
    if registered_model(rt.mlflow, name) is None:
        try:
            rt.mlflow.create_registered_model(name, tags={SEAL_TAG: claim.seal, **({TAG.TEAM: team} if team else {})})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise  # else made a moment ago: by a study of the same team (sealed), or by someone else (refused below)
    model = registered_model(rt.mlflow, name)
    if model is None or not claim.covers(model):
        raise PermissionError(f"the registered model {name!r} was created outside its name's claim; nothing is registered into it")


def _let_team_read(rt: WorkerRuntime, study_id: str, team: str | None, name: str) -> None:
    """Grant ``team``'s MLflow role READ on the registered model (CONVTUNE_MLFLOW_TEAM_ACCESS; :mod:`models.store.access`).

    Best-effort: a refusal is logged, the model stays registered, and ``convtune mlflow-access sync`` grants it later.
    """
    if not (rt.settings.mlflow_team_access and team):
        return
    try:
        TeamAccess(rt.settings.mlflow_tracking_uri).grant_registered_model(team, name)
    except AccessNotGranted as exc:
        log.warning("study %s: team %s's people cannot read the registered model %s in MLflow yet: %s", study_id, team, name, exc)
