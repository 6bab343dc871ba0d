"""One step of a study: run one of its trials through Optuna, then keep ``parallelism`` steps in flight.

A step message carries a study id and a *slot* (see :mod:`models.store.budget`). The step loads the
Optuna study from the shared storage with the sampler and pruner rebuilt from the study spec, and
runs ``study.optimize(objective, n_trials=1)``: Optuna picks the next enqueued (grid, warm-start)
or sampled configuration, the objective creates the trial's child MLflow run, trains it through
:func:`workers.trial.execution.execute_trial` (lease, tracker, checkpoints, outcomes) and reports the
objective after every epoch so the pruner can stop it. Then the step releases its slot, sends the
steps the budget allows, and the step that leaves nothing in flight finishes the study
(:mod:`workers.study.report`). No step waits on another. A step redelivered because its worker
died resumes the same Optuna trial from its last checkpoint (up to the workers' max_attempts).
A step that meets an infrastructure error raises it, Optuna told nothing, for its task to retry
(the retry resumes the trial); a step whose worker lost the trial's lease stops without writing
(the delivery holding the lease now finishes the slot); a step given up ends its slot's trial as
``error`` and goes on (:func:`abandon_step`).

Each step may be delivered twice (a worker died, the reconciler gave its message back). The step
that starts a slot's trial holds the slot's lease (:func:`models.store.keys.slot_lease_id`) from
before the trial exists until it ends, so a second delivery never starts a second trial: it looks
again later, or finds the trial recorded and resumes it. Holding that lease, a step also cleans up
after a delivery of its slot that died before recording its trial: a trial Optuna has RUNNING for
the slot is resumed when it has its run, else failed ``worker_lost`` and its enqueued point sent
again. A trial whose run ended but which Optuna still has RUNNING (its step died, or the storage
failed, in between) is told its state and values from the run (:mod:`workers.study.recovery`).

Budgets (the spec's ``constraints``) on sizes are checked on the sampled configuration before it is
sent: one that breaks them is never trained (``over_budget``, zero epochs, no worker time). Every
trial that ends COMPLETE or PRUNED tells Optuna its constraint values (:mod:`workers.study.measures`),
those on metrics and latencies once it trained; with several objectives the trial's value is the list
of its objectives' values, and nothing is reported per epoch (Optuna's pruners judge one objective).

A trial's outcome becomes the Optuna state the outcome table names (:mod:`models.spec.outcomes`,
``study_state``, read by :func:`workers.study.recovery.trial_state`): COMPLETE with its value (or
values), PRUNED where the configuration is bad (the sampler learns it), FAIL where nothing was
learnt; a ``duplicate`` (same params as trial N) takes N's state and value, not trained again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import optuna
from mlflow.entities import RunInfo
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState
from pydantic import ValidationError

from models.compat import optuna_storage
from models.data import data_root_for
from models.data.sets import InvalidData, describe
from models.spec.objectives import EPOCH_MEASURES
from models.spec.plan import InfeasibleArchitecture, plan_network, size_problem
from models.spec.space import apply_params
from models.spec.study import StudySpec
from models.spec.trial import LatencySpec, TrialSpec, flatten_params
from models.store import runs
from models.store.budget import StudyBudget
from models.store.events import ENDED, STATUS, TRIAL_ENDED, TRIAL_STARTED, EventLog
from models.store.keys import lease_key, slot_lease_id
from models.store.runs import TAG, TERMINAL_STATUSES, study_state, trial_tags
from models.store.search import USER_ATTR, fail_trial, make_pruner, make_sampler, open_storage, storage_kind, suggest, trial_label
from models.store.share import Route
from models.store.teams import team_of
from workers.callbacks.announce import count_outcome
from workers.errors import WorkerError
from workers.failures import is_infrastructure
from workers.runtime import WorkerRuntime
from workers.study.measures import broken_budgets, constrain, final_measures, over_budget_reason, sizes, trial_sizes
from workers.study.recovery import SlotLease, adopt_unrecorded, tell_ended, trial_state
from workers.study.report import finish_study
from workers.training.outcomes import Pruned, Superseded
from workers.trial.execution import LeaseHeld, abandon_run, execute_trial
from workers.trial.lr_finder import LrAutoFailed, with_lr_range

__all__ = ["SendStep", "StepInterrupted", "TrialFailed", "abandon_step", "execute_step", "restore_counters"]

log = logging.getLogger(__name__)
# Optuna logs each trial that ends FAIL with a traceback; convtune logs the outcome and reason itself.
optuna.logging.set_verbosity(optuna.logging.ERROR)
SendStep = Callable[[str, int, Route], None]  # (study_id, slot, where its step goes)
Value = float | list[float]  # what the objective returns: one value, or one per objective


class Parent(NamedTuple):
    """What a step needs of its study's parent run."""

    status: str
    experiment_id: str
    owner: dict[str, str]  # its owner and team tags: its trials carry them too


# Studies whose parent run this process has seen RUNNING: experiment and owner never change, and a running
# study stops through its budget's flag (cancel, lr_auto failure), which every step reads. One request
# fewer per trial; the first step of a study in each process reads the run.
_RUNNING_PARENTS: dict[str, Parent] = {}


def _parent(rt: WorkerRuntime, study_id: str) -> Parent:
    known = _RUNNING_PARENTS.get(study_id)
    if known is not None:
        return known
    run = rt.mlflow.get_run(study_id)
    parent = Parent(run.info.status, run.info.experiment_id, {k: run.data.tags[k] for k in (TAG.OWNER, TAG.TEAM) if k in run.data.tags})
    if parent.status == "RUNNING":
        if len(_RUNNING_PARENTS) >= 1024:
            _RUNNING_PARENTS.clear()
        _RUNNING_PARENTS[study_id] = parent
    return parent


def _route(stored: optuna.Study, spec: StudySpec, parent: Parent) -> Route:
    """Where the study's steps go: its queue, its team's share, at its priority."""
    return Route(stored.user_attrs[USER_ATTR.QUEUE], team_of(parent.owner), spec.priority)


class TrialFailed(WorkerError):
    """The trial ended without telling anything about its configuration (Optuna FAIL)."""


def _without_value(outcome: str, reason: str) -> Exception:
    """What the objective raises for a trial that ended ``outcome`` with no value: Optuna's PRUNED or FAIL, as its outcome says."""
    return optuna.TrialPruned(reason) if trial_state(outcome) == TrialState.PRUNED else TrialFailed(reason)


class StepInterrupted(BaseException):
    """The trial stopped without an ending (its ``__cause__``: Superseded, or an infrastructure error).

    A BaseException so that ``study.optimize`` lets it through without recording the trial (Optuna
    records every Exception as FAIL): the trial stays RUNNING for the delivery that resumes it.
    """


def execute_step(study_id: str, slot: int, rt: WorkerRuntime, send: SendStep) -> str:
    """Run the trial of ``slot`` (unless it already ran or the study stops), then top up the study."""
    budget = StudyBudget(rt.redis, study_id)
    try:
        parent = _parent(rt, study_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            log.error("study %s has no MLflow run; dropping its step", study_id)
            return "skipped"
        raise  # MLflow down: the message is redelivered
    storage = open_storage(rt.settings.study_storage)
    try:
        stored = optuna.load_study(study_name=study_id, storage=storage)
    except KeyError:
        reason = f"study {study_id} is not in this worker's {storage_kind(rt.settings.study_storage)} storage: CONVTUNE_STUDY_STORAGE must be the API's"
        log.error(reason)
        budget.stop("error")
        _end_parent(rt, study_id, "FAILED", "error", reason)
        return "skipped"
    spec = StudySpec.model_validate_json(stored.user_attrs[USER_ATTR.SPEC], context={"stored": True})
    route = _route(stored, spec, parent)
    if spec.lr_auto is not None:
        # One range test for the study, then optim.lr is searched around its result.
        try:
            spec = with_lr_range(study_id, spec, stored, rt, should_stop=lambda: budget.stopped() == "cancelled")
        except LrAutoFailed as exc:
            if budget.stopped() != "cancelled":  # a cancelled study ends through the usual path below
                budget.stop("error")
                _end_parent(rt, study_id, "FAILED", "error", str(exc))
                budget.top_up(release_slot=slot)  # stopped: this only gives the slot back
                return "skipped"

    try:
        outcome = _run_slot(study_id, slot, rt, budget, stored, spec, parent)
    except LeaseHeld:
        raise
    except StepInterrupted as stop:
        if isinstance(stop.__cause__, Superseded):
            log.warning("study %s: slot %d: %s; the delivery holding the lease finishes it", study_id, slot, stop.__cause__.reason)
            return "superseded"
        raise stop.__cause__ from None  # MLflow, Redis or the storage failed: the task retries the step
    except Exception as exc:
        if is_infrastructure(exc):
            raise  # retried: the retry finds the slot's trial and resumes it
        log.exception("study %s: the step of slot %d failed", study_id, slot)  # a bug: the slot is spent, the chain goes on
        outcome = "error"
    _release_slot(study_id, slot, rt, budget, stored, spec, route, send)
    return outcome


def abandon_step(study_id: str, slot: int, rt: WorkerRuntime, send: SendStep, reason: str) -> None:
    """Give up the step of ``slot`` (its task's retries spent, or a bug): its trial ends ``error``, the study goes on.

    Best effort: the slot's trial (unless another worker holds it) ends with ``reason`` in MLflow
    and Optuna, its slot is released, the next steps are sent, and the study ends if that was its last.
    """
    budget = StudyBudget(rt.redis, study_id)
    stored = optuna.load_study(study_name=study_id, storage=open_storage(rt.settings.study_storage))
    record = budget.slot_record(slot)
    if record is not None and abandon_run(record[0], rt, reason) is not None:
        fail_trial(stored, record[1], "error", reason)
    spec = StudySpec.model_validate_json(stored.user_attrs[USER_ATTR.SPEC], context={"stored": True})
    _release_slot(study_id, slot, rt, budget, stored, spec, _route(stored, spec, _parent(rt, study_id)), send)


def _release_slot(
    study_id: str, slot: int, rt: WorkerRuntime, budget: StudyBudget, stored: optuna.Study, spec: StudySpec, route: Route, send: SendStep,
) -> None:
    """Release ``slot``, send the steps the budget allows, and end the study when nothing is left in flight."""
    top = budget.top_up(release_slot=slot)
    if top.in_flight < 0:
        top = _restore_counters(budget, stored, spec)
    for next_slot in top.slots:
        send(study_id, next_slot, route)
    if top.idle and top.released:
        try:
            finish_study(study_id, rt, stored, spec, budget.stopped())
        except Exception as exc:  # never leave the parent RUNNING with nothing left to end it
            log.exception("study %s: its results could not be recorded", study_id)
            _end_parent(rt, study_id, "FAILED", "error", f"the study ended but its results could not be recorded: {exc}")


def _run_slot(study_id: str, slot: int, rt: WorkerRuntime, budget: StudyBudget, stored: optuna.Study, spec: StudySpec, parent: Parent) -> str:
    """Run the slot's trial; ``stopped`` when none starts. Raises LeaseHeld when another delivery runs it, or starts it."""
    record = budget.slot_record(slot)
    if record is None:
        with SlotLease(rt, study_id, slot):
            # A delivery that held the lease a moment ago may have recorded its trial; one that died may have left it unrecorded.
            record = budget.slot_record(slot) or adopt_unrecorded(rt, budget, stored, slot)
            if record is None:
                return _start_trial(study_id, slot, rt, budget, stored, spec, parent)
    trial_id, number = record
    run = rt.mlflow.get_run(trial_id)
    if run.info.status in TERMINAL_STATUSES:
        tell_ended(rt, stored, spec, number, run)  # an earlier delivery ran it and died before telling Optuna (or topping up)
        return "done"
    if rt.redis.exists(lease_key(trial_id)) or rt.redis.exists(lease_key(slot_lease_id(study_id, slot))):
        # Another worker trains it (a redelivered message), or one that died still holds the
        # lease: the task looks again once it could lapse; then the trial has ended or is lost.
        raise LeaseHeld(trial_id, rt.settings.lease_ttl_s)
    return _resume_trial(study_id, slot, rt, budget, stored, spec, parent, trial_id, number)


def _start_trial(study_id: str, slot: int, rt: WorkerRuntime, budget: StudyBudget, stored: optuna.Study, spec: StudySpec, parent: Parent) -> str:
    """Start and run the slot's new trial through Optuna (the caller holds the slot's lease); ``stopped`` when none starts."""
    if budget.stopped() or parent.status in ("KILLED", "FAILED"):
        return "stopped"
    started = float(stored.user_attrs.get(USER_ATTR.STARTED_AT, time.time()))
    if spec.timeout_s is not None and time.time() - started > spec.timeout_s:
        _stop(budget, stored, "timeout", f"its timeout of {spec.timeout_s:g}s passed; running trials finished")
        return "stopped"
    if parent.status == "SCHEDULED":
        runs.start_run(rt.mlflow, study_id)
        _publish(rt, study_id, STATUS, {"state": "running"})

    study = optuna.load_study(
        study_name=study_id, storage=open_storage(rt.settings.study_storage),
        sampler=make_sampler(spec, spec.seed + slot), pruner=make_pruner(spec),
    )
    objective = StudyObjective(
        study_id, slot, spec, rt, budget, parent.experiment_id, stored.user_attrs[USER_ATTR.QUEUE], parent.owner,
    )
    try:
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False, show_progress_bar=False)
    except _EndedEarlier as ended:
        return ended.tell(rt, stored, spec)
    if spec.target is not None and _target_reached(study, spec):
        _stop(budget, stored, "target", f"a trial reached the target {spec.primary.metric} {spec.target:g}")
    return objective.outcome


class StudyObjective:
    """Optuna's objective for one trial: sample, create the child run, train with pruning, map the ending."""

    def __init__(
        self, study_id: str, slot: int, spec: StudySpec, rt: WorkerRuntime, budget: StudyBudget, experiment_id: str, queue: str, owner: dict[str, str],
    ):
        self.study_id, self.slot, self.spec, self.rt, self.budget = study_id, slot, spec, rt, budget
        self.experiment_id, self.queue, self.owner = experiment_id, queue, owner
        self.data_root = data_root_for(rt.settings.data_root, owner.get(TAG.TEAM))  # the study's team's data (none with auth off)
        self.outcome = "error"
        self.sizes: dict[str, float] | None = None  # of the sampled configuration, from its plan
        self.trial_id: str | None = None  # the run of the trial this step runs, once created (for the study's events)

    def __call__(self, trial: optuna.Trial) -> Value:
        trial.set_user_attr(USER_ATTR.SLOT, self.slot)  # first: a step that dies from here on leaves a trial its slot's next delivery finds
        params = suggest(trial, self.spec)
        name = f"{trial_label(params)} #{trial.number}"
        try:
            trial_spec: TrialSpec | None = apply_params(self.spec.base, params, name=name)
            problem = None
            if self.spec.measures_latency and trial_spec.latency is None:  # an objective or budget names a latency
                trial_spec = trial_spec.model_copy(update={"latency": LatencySpec()})
        except ValidationError as exc:
            trial_spec, problem = None, f"the sampled configuration is not a valid trial: {exc.errors(include_url=False)[0]['msg']}"
        plan, infeasible = None, None
        if trial_spec is not None:
            try:
                info = describe(trial_spec.data, self.data_root)
                plan = plan_network(trial_spec.model, info) if info else None
            except InfeasibleArchitecture as exc:
                infeasible = f"infeasible architecture: {exc}"
            except InvalidData as exc:
                problem = str(exc)
            # The API sized the base and the space's corners (up to its limit); a sampled configuration may still be larger.
            too_large = size_problem(plan, self.rt.settings.max_params, self.rt.settings.max_flops_per_sample) if plan is not None else None
            if too_large:
                infeasible = f"the sampled configuration is too large: {too_large}"
        self.sizes = sizes(plan)
        created = self._create_run(trial, name, params, trial_spec, plan)
        trial_id = created.run_id
        trial.set_user_attr(USER_ATTR.TRIAL_ID, trial_id)
        self.budget.record_slot(self.slot, trial_id, trial.number)
        self.trial_id = trial_id
        _publish(self.rt, self.study_id, TRIAL_STARTED, {"trial_id": trial_id, "number": trial.number, "name": name, "params": params})

        # The API raises the study's stop flag, then the cancel flags of the trials it finds running:
        # checked after TRIAL_ID is stored, one of the two always sees the other.
        if self.budget.stopped() == "cancelled":
            return self._end(trial, trial_id, "KILLED", "cancelled", "the study was cancelled before this trial started")
        if problem:
            return self._end(trial, trial_id, "FAILED", "invalid_data" if trial_spec else "error", problem)
        over = broken_budgets(self.spec, self.sizes) if not infeasible else []
        if over:  # checked before dispatch: never trained, and the sampler learns the boundary
            trial.set_user_attr(USER_ATTR.OVER_BUDGET, over)
            trial.set_user_attr(USER_ATTR.MEASURES, self.sizes)
            constrain(trial, self.spec, self.sizes)
            return self._end(trial, trial_id, "FAILED", "over_budget", over_budget_reason(over, self.sizes))
        twin = _twin(trial)
        if twin is not None:
            return self._reuse(trial, trial_id, twin)
        if infeasible:
            return self._end(trial, trial_id, "FAILED", "infeasible", infeasible)
        return self._train(trial, trial_id, trial_spec, created)

    def _train(self, trial: optuna.Trial, trial_id: str, trial_spec: TrialSpec, created: RunInfo | None = None) -> Value:
        """Train the trial (``created``: its run's info when this step created it, else it is read)."""
        self.trial_id = trial_id
        primary, pruner = self.spec.primary, self.spec.pruner.name
        # Optuna's report() and its pruners take one objective's value per epoch.
        reports = not self.spec.multi_objective and primary.metric in EPOCH_MEASURES
        history: list[dict[str, float]] = []

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            history.append(dict(metrics))
            if not reports:
                return
            value = float(metrics[primary.metric])
            trial.report(value, epoch)
            if trial.should_prune():
                raise Pruned(f"pruned by the {pruner} pruner after epoch {epoch}: {primary.metric} {value:.4f}")

        try:
            ending = execute_trial(
                trial_id, trial_spec.model_dump(mode="json"), self.rt, on_epoch_end=on_epoch_end, created=created, team=self.owner.get(TAG.TEAM),
                on_resume=history.extend,  # resumed: the epochs before it count too (a best_epoch objective)
            )
        except Superseded as exc:
            raise StepInterrupted() from exc
        except Exception as exc:
            if is_infrastructure(exc):
                raise StepInterrupted() from exc
            raise
        if ending is None:  # an earlier delivery ended the run and died before telling Optuna: told from the run
            raise _EndedEarlier(trial_id, trial.number)
        outcome, reason = ending.outcome, ending.reason
        known = self.sizes if self.sizes is not None else trial_sizes(trial_spec, self.data_root)
        if outcome == "succeeded" and history:
            return self._result(trial, trial_id, reason, history, known)
        constrain(trial, self.spec, known)
        self._record(trial, outcome, reason, len(history))
        raise _without_value(outcome, reason)

    def _result(self, trial: optuna.Trial, trial_id: str, reason: str, history: list[dict[str, float]], known: dict[str, float]) -> Value:
        """A trained trial's value(s), its measures and constraint values; a budget on a metric it broke is told, not hidden."""
        logged = self.rt.mlflow.get_run(trial_id).data.metrics if self.spec.measures_latency else {}
        measures = final_measures(self.spec, history, known, logged)
        trial.set_user_attr(USER_ATTR.MEASURES, measures)
        missing = [g.metric for g in self.spec.goals if g.metric not in measures]
        if missing:
            self._record(trial, "error", f"{reason}; but it has no {', '.join(missing)} to optimise", len(history))
            raise TrialFailed(f"no {', '.join(missing)} measured")
        constrain(trial, self.spec, measures)
        broken = broken_budgets(self.spec, measures)
        if broken:
            trial.set_user_attr(USER_ATTR.OVER_BUDGET, broken)
            reason = f"{reason}; over budget after training (not chosen): {'; '.join(broken)}"
        values = [measures[g.metric] for g in self.spec.goals]
        value = values if self.spec.multi_objective else values[0]
        self._record(trial, "succeeded", reason, len(history), value)
        return value

    def _reuse(self, trial: optuna.Trial, trial_id: str, twin: optuna.trial.FrozenTrial) -> Value:
        """Give this trial its twin's result instead of training the same configuration again."""
        twin_run = twin.user_attrs.get(USER_ATTR.TRIAL_ID, "?")
        trial.set_user_attr(USER_ATTR.DUPLICATE_OF, twin.number)
        if twin.state == TrialState.RUNNING:
            reason = f"same parameters as trial #{twin.number} (run {twin_run}), still running: not trained twice"
            self._end_run(trial_id, "FINISHED", "duplicate", reason)
            self._record(trial, "duplicate", reason, 0)
            raise TrialFailed(reason)
        if not self.spec.multi_objective:
            for step, value in sorted(twin.intermediate_values.items()):
                trial.report(value, step)
        for key, value in twin.constraints.items():
            trial.set_constraint(key, value)
        if USER_ATTR.MEASURES in twin.user_attrs:
            trial.set_user_attr(USER_ATTR.MEASURES, twin.user_attrs[USER_ATTR.MEASURES])
        state = "value" if twin.state == TrialState.COMPLETE else "pruning"
        reason = f"same parameters as trial #{twin.number} (run {twin_run}): its {state} reused, not trained again"
        metrics = {g.metric: v for g, v in zip(self.spec.goals, twin.values or [], strict=False)}
        self._end_run(trial_id, "FINISHED", "duplicate", reason, metrics)
        self._record(trial, "duplicate", reason, 0)
        if twin.state == TrialState.COMPLETE:
            return list(twin.values) if self.spec.multi_objective else float(twin.value)
        raise optuna.TrialPruned(reason)

    def _end(self, trial: optuna.Trial, trial_id: str, status: str, outcome: str, reason: str) -> Value:
        self._end_run(trial_id, status, outcome, reason)
        self._record(trial, outcome, reason, 0)
        raise _without_value(outcome, reason)

    def _record(self, trial: optuna.Trial, outcome: str, reason: str, epochs: int, value: Value | None = None) -> None:
        self.outcome = outcome
        count_outcome(self.rt, outcome)
        for key, attr in ((USER_ATTR.OUTCOME, outcome), (USER_ATTR.REASON, reason[:1000]), (USER_ATTR.EPOCHS, epochs)):
            trial.set_user_attr(key, attr)
        ended = {"trial_id": self.trial_id, "number": trial.number, "outcome": outcome, "reason": reason[:1000], "value": value, "epochs": epochs}
        _publish(self.rt, self.study_id, TRIAL_ENDED, ended)

    def _end_run(self, trial_id: str, status: str, outcome: str, reason: str, metrics: dict[str, float] | None = None) -> None:
        """End a trial that never trained (zero epochs)."""
        runs.end_run(self.rt.mlflow, trial_id, status, outcome, reason, metrics=metrics, tags={TAG.EPOCHS_DONE: "0"})

    def _create_run(self, trial: optuna.Trial, name: str, params: dict[str, Any], trial_spec: TrialSpec | None, plan: Any) -> RunInfo:
        """The trial's child run under the study's parent, params logged once, here; RUNNING from the start (trained at once)."""
        study = {TAG.PARENT: self.study_id, TAG.STUDY_ID: self.study_id, TAG.STUDY_TRIAL: str(trial.number)}
        study.update(self.owner)  # the study's team owns its trials: only it (or an admin) reads or cancels them
        if trial_spec is None:  # a sampled configuration that is not a valid trial: its params say which
            tags, flat = {TAG.KIND: "trial", TAG.QUEUE: self.queue, **study}, {k: json.dumps(v) for k, v in params.items()}
        else:
            tags, flat = trial_tags(trial_spec, plan, self.queue, **study), flatten_params(trial_spec)
        return runs.create_started_run(self.rt.mlflow, self.experiment_id, name=name, tags=tags, params=flat)


class _EndedEarlier(BaseException):
    """The trial's run had ended before this delivery trained it: Optuna is told from the run, by the caller.

    A BaseException, as StepInterrupted, so that ``study.optimize`` records nothing itself.
    """

    def __init__(self, trial_id: str, number: int):
        super().__init__(trial_id)
        self.trial_id, self.number = trial_id, number

    def tell(self, rt: WorkerRuntime, stored: optuna.Study, spec: StudySpec) -> str:
        tell_ended(rt, stored, spec, self.number, rt.mlflow.get_run(self.trial_id))
        return "done"


def _twin(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier trial of the study with the same parameters whose result can stand for this one."""
    for other in trial.study.get_trials(deepcopy=False):
        if other.number == trial.number or other.params != trial.params:
            continue
        if other.state in (TrialState.COMPLETE, TrialState.PRUNED) and other.user_attrs.get(USER_ATTR.OUTCOME) != "cancelled":
            return other
        if other.state == TrialState.RUNNING:
            return other
    return None


def _target_reached(study: optuna.Study, spec: StudySpec) -> bool:
    try:
        best = study.best_value
    except ValueError:
        return False
    return best >= spec.target if spec.primary.resolved_direction == "maximize" else best <= spec.target  # type: ignore[operator]


def _stop(budget: StudyBudget, stored: optuna.Study, why: str, reason: str) -> None:
    budget.stop(why)
    stored.set_user_attr(USER_ATTR.STOPPED, json.dumps({"why": why, "reason": reason}))


def _resume_trial(
    study_id: str, slot: int, rt: WorkerRuntime, budget: StudyBudget, stored: optuna.Study, spec: StudySpec, parent: Parent, trial_id: str, number: int,
) -> str:
    """A redelivered step whose trial lost its worker: train the same Optuna trial on from its checkpoint.

    ``execute_trial`` counts the attempt (failing it as worker_lost past max_attempts) and resumes
    from the last epoch's checkpoint; the pruner keeps judging it, and the result is told to Optuna.
    """
    study = optuna.load_study(study_name=study_id, storage=open_storage(rt.settings.study_storage), sampler=make_sampler(spec, spec.seed + slot), pruner=make_pruner(spec))
    optuna_id = optuna_storage.trial_id(study, number)
    raw_spec = runs.with_spec(rt.mlflow, trial_id, rt.mlflow.get_run(trial_id).data.tags).get(TAG.SPEC)
    if optuna_storage.storage(study).get_trial(optuna_id).state != TrialState.RUNNING or raw_spec is None:
        _fail_lost_trial(rt, stored, trial_id, number)
        return "worker_lost"
    log.warning("study %s: trial #%d (%s) lost its worker; resuming it", study_id, number, trial_id)
    trial = optuna.Trial(study, optuna_id)  # the running trial, rebuilt: report() and should_prune() work on it
    objective = StudyObjective(
        study_id, slot, spec, rt, budget, parent.experiment_id, stored.user_attrs[USER_ATTR.QUEUE], parent.owner,
    )
    try:
        study.tell(trial, objective._train(trial, trial_id, TrialSpec.model_validate_json(raw_spec)))
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except TrialFailed:
        study.tell(trial, state=TrialState.FAIL)
    except _EndedEarlier as ended:
        return ended.tell(rt, stored, spec)
    return objective.outcome


def _fail_lost_trial(rt: WorkerRuntime, stored: optuna.Study, trial_id: str, number: int) -> None:
    """A lost trial that cannot be resumed: fail it (worker_lost), in MLflow and Optuna."""
    reason = "its worker was lost and the trial could not be resumed"
    log.warning("study trial %s (#%d): %s", trial_id, number, reason)
    runs.end_run(rt.mlflow, trial_id, "FAILED", "worker_lost", reason)
    fail_trial(stored, number, "worker_lost", reason)


def _restore_counters(budget: StudyBudget, stored: optuna.Study, spec: StudySpec) -> Any:
    """Redis lost the study's counters: rebuild them from the Optuna storage, then top up."""
    restored = restore_counters(budget, stored, spec)
    # The step that rebuilt the counters stands for the release it could not make: it may end the study.
    return replace(budget.top_up(), released=restored)


def restore_counters(budget: StudyBudget, stored: optuna.Study, spec: StudySpec) -> bool:
    """Rebuild a study's lost counters from its Optuna storage (unless they exist again); whether this call did.

    Claimed: every started trial and every slot one recorded, so a new slot never reuses a number.
    In flight: the slots of the trials still RUNNING (their records are written again); the rest released.
    """
    trials = stored.get_trials(deepcopy=False)
    started = sum(1 for t in trials if t.state != TrialState.WAITING)
    slots = [int(t.user_attrs[USER_ATTR.SLOT]) for t in trials if USER_ATTR.SLOT in t.user_attrs]
    running = {
        int(t.user_attrs[USER_ATTR.SLOT]): (str(t.user_attrs[USER_ATTR.TRIAL_ID]), t.number)
        for t in trials if t.state == TrialState.RUNNING and USER_ATTR.SLOT in t.user_attrs and USER_ATTR.TRIAL_ID in t.user_attrs
    }
    stopped = json.loads(stored.user_attrs.get(USER_ATTR.STOPPED, "{}")).get("why", "")
    claimed = max([started, *slots])
    restored = budget.restore(int(stored.user_attrs[USER_ATTR.BUDGET]), spec.parallelism, claimed, running, stopped)
    if restored:
        log.warning(
            "study %s: its counters were lost; restored them from the Optuna storage (%d trials started, %d running)",
            stored.study_name, started, len(running),
        )
    return restored


def _end_parent(rt: WorkerRuntime, study_id: str, status: str, outcome: str, reason: str) -> None:
    runs.end_run(rt.mlflow, study_id, status, outcome, reason)
    _publish(rt, study_id, ENDED, {"state": study_state(status), "outcome": outcome, "reason": reason})


def _publish(rt: WorkerRuntime, study_id: str, kind: str, data: dict[str, Any]) -> None:
    """Tell clients that follow the study what happened (best effort: never raises, see models.store.events)."""
    EventLog(rt.redis).publish(study_id, kind, data)
