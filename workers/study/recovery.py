"""Settling a study's trials after a delivery died: Optuna told from MLflow, the record, and lost starts failed.

A study trial lives in two stores: its MLflow run (the record: status, outcome, metrics) and its
Optuna trial (what the sampler learns from). A step that dies, or a study storage that blips,
between the two leaves them apart. Whoever meets that (the step's next delivery, the reconciler,
the study's ending) settles it here:

- a RUNNING Optuna trial whose run ended is told the run's state and values (:func:`tell_ended`),
  so a trial that succeeded keeps its place in ``best``, the Pareto front and ``register_as``;
- one whose step died before it created its run fails ``worker_lost``, and its enqueued point
  (grid, warm start) is enqueued again (:func:`fail_unstarted`);
- the step that starts a slot's trial holds the slot's lease (:class:`SlotLease`), so a second
  delivery of the slot never starts a second trial; holding it, a step adopts what a dead delivery
  of its slot left unrecorded (:func:`adopt_unrecorded`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from models.compat import optuna_storage
from models.spec.outcomes import OUTCOMES
from models.spec.study import StudySpec
from models.store import runs
from models.store.budget import StudyBudget
from models.store.keys import slot_lease_id
from models.store.runs import TAG
from models.store.search import USER_ATTR, fail_trial
from workers.runtime import WorkerRuntime
from workers.study.measures import best_epoch_metrics, broken_budgets, constrain, run_measures, run_sizes
from workers.trial.execution import LeaseHeld
from workers.trial.lease import Lease

__all__ = ["PRUNED_OUTCOMES", "SlotLease", "adopt_unrecorded", "ended_run", "fail_unstarted", "tell_ended", "trial_state"]

log = logging.getLogger(__name__)


def ended_run(rt: WorkerRuntime, trial_id: str) -> Any | None:
    """The trial's MLflow run if it has ended, else None (none, or still open)."""
    try:
        run = rt.mlflow.get_run(trial_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.status in runs.TERMINAL_STATUSES else None


# The outcomes a study tells Optuna PRUNED (models.spec.outcomes): the sampler learns the configuration is bad.
PRUNED_OUTCOMES = tuple(name for name, o in OUTCOMES.items() if o.counts_as_pruned)
_STATUS_OUTCOMES = {"FINISHED": "succeeded", "KILLED": "cancelled", "FAILED": "error"}  # a run ended without an outcome tag


def trial_state(outcome: str) -> TrialState:
    """The Optuna state of a study trial that ended ``outcome``, as the outcome table says.

    An outcome without a state of its own (``duplicate``: its twin's), or one the table lacks (a tag
    written outside convtune), is FAIL: nothing is learnt about the configuration.
    """
    ended = OUTCOMES.get(outcome)
    return TrialState[ended.study_state] if ended is not None and ended.study_state is not None else TrialState.FAIL


def tell_ended(rt: WorkerRuntime, stored: optuna.Study, spec: StudySpec, number: int, run: Any) -> bool:
    """Tell Optuna how trial ``number`` ended from its ended MLflow run; whether it was still RUNNING there (else nothing is done).

    MLflow is the record: a delivery that ended the run and died (or lost the study storage)
    before telling Optuna leaves the trial RUNNING. Its state, values, constraints and measures are
    rebuilt from the run as the objective would have told them, so a trial that succeeded keeps its
    place in ``best``, the Pareto front and ``register_as`` instead of counting as lost.
    """
    storage = optuna_storage.storage(stored)
    optuna_id = optuna_storage.trial_id(stored, number)
    if storage.get_trial(optuna_id).state != TrialState.RUNNING:
        return False
    trial = optuna.Trial(stored, optuna_id)
    tags = run.data.tags
    outcome = tags.get(TAG.OUTCOME) or _STATUS_OUTCOMES.get(run.info.status, "error")
    reason = tags.get(TAG.REASON) or f"its run ended {run.info.status.lower()}"
    state, values = _ended_state(rt, stored, spec, trial, run, outcome)
    if state == TrialState.FAIL and outcome == "succeeded":
        outcome, reason = "error", f"{reason}; but it has none of {', '.join(g.metric for g in spec.goals)} to optimise"
    for key, value in ((USER_ATTR.OUTCOME, outcome), (USER_ATTR.REASON, reason[:1000]), (USER_ATTR.EPOCHS, int(tags.get(TAG.EPOCHS_DONE, "0") or 0))):
        trial.set_user_attr(key, value)
    stored.tell(trial, values, state=state, skip_if_finished=True)
    log.warning("study %s: trial #%d (%s) had ended %s but the study was never told; told it from its run", stored.study_name, number, run.info.run_id, outcome)
    return True


def _ended_state(rt: WorkerRuntime, stored: optuna.Study, spec: StudySpec, trial: optuna.Trial, run: Any, outcome: str) -> tuple[TrialState, Any]:
    """The Optuna state and value(s) of an ended run's outcome, its constraints and measures set on ``trial``."""
    user_attrs = trial.user_attrs
    if outcome == "duplicate" and USER_ATTR.DUPLICATE_OF in user_attrs:
        return _twin_state(stored, spec, trial, int(user_attrs[USER_ATTR.DUPLICATE_OF]))
    measured = user_attrs.get(USER_ATTR.MEASURES) or run_sizes(run.data.tags)
    if outcome != "succeeded":
        if not trial.constraints:  # an over_budget trial had them set before its run ended
            constrain(trial, spec, measured)
        return (TrialState.PRUNED if trial_state(outcome) == TrialState.PRUNED else TrialState.FAIL), None
    series = {m: [x.value for x in sorted(rt.mlflow.get_metric_history(run.info.run_id, m), key=lambda x: x.step)] for m in best_epoch_metrics(spec)}
    measures = run_measures(spec, run.data.metrics, series, run_sizes(run.data.tags))
    if any(g.metric not in measures for g in spec.goals):
        return TrialState.FAIL, None
    trial.set_user_attr(USER_ATTR.MEASURES, measures)
    constrain(trial, spec, measures)
    broken = broken_budgets(spec, measures)
    if broken:
        trial.set_user_attr(USER_ATTR.OVER_BUDGET, broken)
    values = [measures[g.metric] for g in spec.goals]
    return TrialState.COMPLETE, (values if spec.multi_objective else values[0])


def _twin_state(stored: optuna.Study, spec: StudySpec, trial: optuna.Trial, twin_number: int) -> tuple[TrialState, Any]:
    """A duplicate's state: its twin's, as the objective reused it (a twin still running: nothing learnt)."""
    twin = stored.get_trials(deepcopy=False)[twin_number]
    for key, value in twin.constraints.items():
        trial.set_constraint(key, value)
    if twin.state == TrialState.COMPLETE:
        return TrialState.COMPLETE, (list(twin.values) if spec.multi_objective else float(twin.value))
    return (TrialState.PRUNED if twin.state == TrialState.PRUNED else TrialState.FAIL), None


def fail_unstarted(stored: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, requeue: bool = True) -> None:
    """Fail a RUNNING trial whose step was lost (``worker_lost``); with ``requeue``, its enqueued point (grid, warm start) runs again.

    Optuna took the point off its queue when the trial started: failed, it would never run. It is
    enqueued again unless another trial that did not fail already has the same fixed parameters.
    """
    failed = fail_trial(stored, trial.number, "worker_lost", reason)
    point = trial.system_attrs.get("fixed_params")
    if not failed or not requeue or not point:
        return
    taken = any(
        t.number != trial.number and t.state != TrialState.FAIL and t.system_attrs.get("fixed_params") == point
        for t in stored.get_trials(deepcopy=False)
    )
    if not taken:
        stored.enqueue_trial(point, skip_if_exists=False)
        log.warning("study %s: trial #%d lost its step before it started; its enqueued point runs again", stored.study_name, trial.number)


class SlotLease:
    """The right to start a slot's trial, held (renewed) while the step that starts it runs.

    Raises LeaseHeld on entry when another delivery of the slot holds it: it is starting or training
    the slot's trial, or it died and its lease lapses within the TTL.
    """

    def __init__(self, rt: WorkerRuntime, study_id: str, slot: int):
        self.lease = Lease(rt.redis, slot_lease_id(study_id, slot), rt.settings.lease_ttl_s)
        self.name, self.ttl_s = slot_lease_id(study_id, slot), rt.settings.lease_ttl_s

    def __enter__(self) -> SlotLease:
        if not self.lease.acquire():
            raise LeaseHeld(self.name, self.ttl_s)
        self.lease.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lease.__exit__(None, None, None)


def adopt_unrecorded(rt: WorkerRuntime, budget: StudyBudget, stored: optuna.Study, slot: int) -> tuple[str, int] | None:
    """Settle the trials a dead delivery of ``slot`` left RUNNING without recording them (the caller holds the slot's lease).

    One with its run is recorded for the slot, and resumed (or told from its ended run) as any
    recorded trial; one without (its step died before creating the run) fails ``worker_lost`` and
    its enqueued point runs again. A RUNNING trial with no slot at all died before the step could
    name its slot: it is failed too, once older than a lease TTL (no live step takes that long).
    """
    adopted = None
    now = time.time()
    for t in stored.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        mine = t.user_attrs.get(USER_ATTR.SLOT) == slot
        if mine and USER_ATTR.TRIAL_ID in t.user_attrs:
            adopted = (str(t.user_attrs[USER_ATTR.TRIAL_ID]), t.number)
        elif mine or (USER_ATTR.SLOT not in t.user_attrs and t.datetime_start is not None and now - t.datetime_start.timestamp() > rt.settings.lease_ttl_s):
            fail_unstarted(stored, t, "its step's worker was lost before the trial started")
    if adopted is not None:
        log.warning("study %s: slot %d: trial #%d was started but never recorded for its slot; resuming it", stored.study_name, slot, adopted[1])
        budget.record_slot(slot, *adopted)
    return adopted
