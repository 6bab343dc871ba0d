"""Executing one delivery of a trial message, exactly once per trial, whatever Redis redelivers.

A delivery first looks at the trial's MLflow run: an ended run (finished, cancelled while queued,
failed) means a duplicate, which is acknowledged and skipped. Then it takes the trial's lease; a
held lease means another worker is training it right now. The holder counts its attempt (a trial
whose workers keep dying is failed as ``worker_lost`` after ``max_attempts``), trains with
checkpoints, and ends the run with exactly one outcome. A Python exception in training is a
failed trial with its reason, never a lost message.

Two things leave without an ending. An infrastructure error (MLflow or Redis down, see
:mod:`workers.failures`) escapes for the task to retry later; that start is not counted as an
attempt, and the checkpoint stays for the retry to resume from. A worker that loses the lease
midway (paused past its TTL, Redis lost the key) raises :class:`Superseded` at its next check and
writes nothing more, neither metrics nor an ending, and keeps the checkpoint: the delivery that
holds the lease now resumes from it. Each delivery's lease comes with a fence (see
:mod:`workers.trial.lease`) that its checkpoints and its run carry, so one that wakes up late
cannot replace a later delivery's checkpoint or end the run under it.

Every ending this module writes deletes the run's checkpoints, every fence's; what other endings
leave (the reconciler's, the API's, a study step's recovery) is swept by
:func:`workers.reconciler.checkpoints.sweep_checkpoints`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis
import torch
from mlflow.entities import RunInfo
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ValidationError

from models.data import data_root_for
from models.spec.trial import TrialSpec
from models.store.events import EventLog
from models.store.keys import attempts_key, cancel_key, lease_key
from models.store.runs import TERMINAL_STATUSES
from workers.errors import WorkerError
from workers.failures import is_infrastructure
from workers.runtime import WorkerRuntime
from workers.training.devices import train_on_devices
from workers.training.latency import measure_latency
from workers.training.outcomes import Ending, Superseded, classify
from workers.training.train import TrainingContext, checkpoint_files, remove_checkpoints
from workers.trial.accounting import Meter, record_usage
from workers.trial.lease import Lease
from workers.trial.provenance import provenance_tags
from workers.trial.recording import recording
from workers.trial.tracking import MlflowTracker

__all__ = [
    "LeaseHeld", "abandon_run", "admit", "count_attempt", "execute_trial", "fence_floor", "forget_attempt", "lost_too_often", "tracker_for",
]

log = logging.getLogger(__name__)
SpecT = TypeVar("SpecT", bound=BaseModel)


class LeaseHeld(WorkerError):
    """Another worker holds this trial's lease; try again after ``retry_in_s``."""

    def __init__(self, trial_id: str, retry_in_s: int):
        super().__init__(f"trial {trial_id} is being trained by another worker")
        self.retry_in_s = retry_in_s


def execute_trial(
    trial_id: str, payload: dict, rt: WorkerRuntime, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    created: RunInfo | None = None, team: str | None = None, on_resume: Callable[[list[dict[str, float]]], None] | None = None,
) -> Ending | None:
    """Run one delivery of ``trial_id``; how the trial ended, or None for a duplicate delivery.

    ``on_epoch_end`` is a study's pruning hook and ``on_resume`` is told the epochs a resumed delivery
    restored (see :class:`workers.training.train.TrainingContext`);
    ``created`` and ``team``, the run's info and team when the caller created it a moment ago (a study's
    step): not read back. Otherwise the run's team is read with its status; the trial reads that team's data.
    Raises LeaseHeld (another worker trains it), Superseded (this worker lost the lease midway) and
    infrastructure errors (retried by the task).
    """
    tracker = tracker_for(rt, trial_id, log_model=rt.settings.log_model)
    if created is not None:
        tracker.created(created, team)
    spec, ending = admit(tracker, trial_id, payload, TrialSpec, rt, "trial")
    if spec is None:
        return ending

    lease = Lease(rt.redis, trial_id, rt.settings.lease_ttl_s)
    if not lease.acquire(floor=fence_floor(tracker, rt.checkpoint_path(trial_id))):
        raise LeaseHeld(trial_id, rt.settings.lease_ttl_s)
    with lease:
        tracker.hold(lease)
        attempt = count_attempt(rt, trial_id)
        try:
            with recording(tracker, attempt, rt.settings.system_metrics_interval_s, rt.settings.run_log_max_bytes):
                return _train(trial_id, spec, tracker, rt, lease, attempt, on_epoch_end, on_resume)
        except Superseded as exc:
            log.warning("trial %s: %s; stopped without recording anything", trial_id, exc.reason)
            raise
        except Exception as exc:
            if is_infrastructure(exc):
                forget_attempt(rt, trial_id)  # a retry after an outage is not a lost worker
            raise


def _train(
    trial_id: str, spec: TrialSpec, tracker: MlflowTracker, rt: WorkerRuntime, lease: Lease, attempt: int,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None, on_resume: Callable[[list[dict[str, float]]], None] | None = None,
) -> Ending:
    if attempt > rt.settings.max_attempts:
        return _end(tracker, lost_too_often(attempt, rt.settings.max_attempts), rt.checkpoint_path(trial_id), rt)
    if attempt > 1:
        log.warning("trial %s: attempt %d, resuming from its last checkpoint", trial_id, attempt)
    else:
        log.info("trial %s: training on %s", trial_id, rt.device)  # which worker trained what, in its own log
    tracker.provenance = provenance_tags(spec.data, data_root_for(rt.settings.data_root, tracker.team), rt.device)
    tracker.starting(str(rt.device), attempt)  # RUNNING once its batches are resolved (log_batches), in one request
    tracker.final_epoch = spec.optim.epochs
    ctx = TrainingContext(
        device=rt.device, data_root=data_root_for(rt.settings.data_root, tracker.team),
        checkpoint_path=rt.checkpoint_path(trial_id), fence=lease.fence, should_cancel=lambda: bool(rt.redis.exists(cancel_key(trial_id))),
        still_owner=lease.held, confirm_owner=lambda: lease.held(strict=True), check_every_steps=rt.settings.cancel_check_steps,
        on_epoch_end=on_epoch_end, on_resume=on_resume, on_setup=tracker.log_batches, on_checkpoint_lost=tracker.checkpoint_lost,
        cpu_memory_limit_bytes=rt.settings.cpu_memory_limit_mb * 2**20, gpu_memory_fraction=rt.settings.gpu_memory_fraction,
    )
    ending: Ending | None = None
    meter = Meter(ctx.device, spec.devices, ctx.samples)  # charged to the run with its ending
    try:
        result = train_on_devices(spec, tracker, ctx, rt.devices_owned)
        if spec.latency is not None:  # timed only when the spec asks for it: timing costs inference passes
            for key, value in measure_latency(spec, ctx.device, ctx.data_root).items():
                rt.mlflow.log_metric(trial_id, key, value)
        if result.confusion is not None:
            tracker.log_confusion(result.confusion, result.class_names or [])
    except Superseded:
        raise
    except Exception as exc:
        if is_infrastructure(exc):
            raise  # MLflow or Redis failed, not the trial: the task retries it from its checkpoint
        ending = classify(exc)
        log.log(logging.ERROR if ending.outcome == "error" else logging.INFO, "trial %s ended %s: %s", trial_id, ending.outcome, ending.reason, exc_info=ending.outcome == "error")
    meter.charge(tracker)
    if ending is not None:
        if ending.outcome == "out_of_memory" and rt.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed step's tensors died with its traceback: give their memory back
        return _end(tracker, ending, ctx.checkpoint_path, rt)
    reason = f"trained {result.epochs_done} epochs; best val_accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}"
    return _end(tracker, Ending("FINISHED", "succeeded", reason), ctx.checkpoint_path, rt)


def admit(tracker: MlflowTracker, run_id: str, payload: dict, spec_model: type[SpecT], rt: WorkerRuntime, what: str) -> tuple[SpecT | None, Ending | None]:
    """Decide whether a delivery of ``run_id`` is worth running: its validated spec, or None and how it ended.

    A run that does not exist or has already ended is a duplicate (no ending: skipped); a payload the
    worker refuses ends the run as ``error``; a cancel flag raised while queued ends it ``cancelled``.
    Raises MlflowException when MLflow is down (RedisError when Redis is), which the task retries
    later with backoff (:mod:`workers.failures`): the message is never acked away.
    """
    try:
        status = tracker.status()
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            log.error("%s %s has no MLflow run; dropping its message", what, run_id)
            return None, None
        raise
    if status in TERMINAL_STATUSES:
        log.info("%s %s already ended (%s); duplicate delivery skipped", what, run_id, status)
        return None, None
    try:
        spec = spec_model.model_validate(payload)
    except ValidationError as exc:
        return None, _end(tracker, Ending("FAILED", "error", f"the worker refused the spec: {exc}"), rt=rt)
    if rt.redis.exists(cancel_key(run_id)):
        return None, _end(tracker, Ending("KILLED", "cancelled", "cancelled on request before it started"), rt=rt)
    return spec, None


def count_attempt(rt: WorkerRuntime, run_id: str) -> int:
    """Count one more start of ``run_id`` (kept as long as its message can be redelivered); the count."""
    attempt = int(rt.redis.incr(attempts_key(run_id)))
    rt.redis.expire(attempts_key(run_id), rt.settings.visibility_timeout_s * 4)
    return attempt


def forget_attempt(rt: WorkerRuntime, run_id: str) -> None:
    """Take back the start :func:`count_attempt` counted: this delivery left for an infrastructure error, not a crash."""
    try:
        rt.redis.decr(attempts_key(run_id))
    except redis.RedisError:
        pass  # Redis is what failed: the count stays one too high, within max_attempts' margin


def abandon_run(run_id: str, rt: WorkerRuntime, reason: str) -> Ending | None:
    """End ``run_id`` as ``error`` with ``reason`` when its task gives up; None when it ended already or another worker holds it."""
    if rt.redis.exists(lease_key(run_id)):
        log.warning("run %s: its task gave up (%s), but another worker holds its lease; left to that worker", run_id, reason)
        return None
    tracker = tracker_for(rt, run_id, log_model=False)
    if tracker.status() in TERMINAL_STATUSES:
        return None
    return _end(tracker, Ending("FAILED", "error", reason), rt.checkpoint_path(run_id), rt)


def fence_floor(tracker: MlflowTracker, checkpoint: Path | None = None) -> int:
    """The highest fence the run (as :meth:`MlflowTracker.status` read it) and its checkpoints carry.

    The next lease's fence goes above it, even from a Redis that forgot the counter: else its holder would
    resume from an earlier holder's checkpoint forever and have every write refused.
    """
    on_disk = [fence for fence, _ in checkpoint_files(checkpoint)] if checkpoint is not None else []
    return max([tracker.fence_seen, *on_disk])


def tracker_for(rt: WorkerRuntime, run_id: str, log_model: bool) -> MlflowTracker:
    """The tracker of ``run_id`` as this worker's settings say (model logging, where artifacts go), publishing its events."""
    tracker = MlflowTracker(rt.mlflow, run_id, log_model=log_model, artifacts_destination=rt.settings.artifacts_destination)
    tracker.events = EventLog(rt.redis)
    return tracker


def lost_too_often(attempt: int, max_attempts: int) -> Ending:
    """The ending of a run started more than ``max_attempts`` times: its workers kept dying."""
    return Ending("FAILED", "worker_lost", f"its worker was lost {attempt - 1} times (max_attempts={max_attempts}); not retried again")


def _end(tracker: MlflowTracker, ending: Ending, checkpoint: Path | None = None, rt: WorkerRuntime | None = None) -> Ending:
    tracker.finish(ending)
    if rt is not None:
        record_usage(rt, tracker)  # closes the run's row in the usage table, with what it used (zeros: it trained nothing)
    if checkpoint is not None:
        remove_checkpoints(checkpoint)  # every fence's: an earlier holder's file too
    return ending
