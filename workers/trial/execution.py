"""Executing one delivery of a trial message, exactly once per trial, whatever Redis redelivers.

A delivery first looks at the trial's MLflow run: an ended run (finished, cancelled while queued,
failed) means a duplicate, which is acknowledged and skipped. Then it takes the trial's lease; a
held lease means another worker is training it right now. The holder counts its attempt (a trial
whose workers keep dying is failed as ``worker_lost`` after ``max_attempts``), trains with
checkpoints, and ends the run with exactly one outcome. A Python exception in training is a
failed trial with its reason, never a lost message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ValidationError

from models.spec.trial import TrialSpec
from models.store.keys import attempts_key, cancel_key
from models.store.runs import TERMINAL_STATUSES
from workers.runtime import WorkerRuntime
from workers.training.devices import train_on_devices
from workers.training.outcomes import Ending, classify
from workers.training.train import TrainingContext
from workers.trial.lease import Lease
from workers.trial.tracking import MlflowTracker

__all__ = ["LeaseHeld", "admit", "count_attempt", "execute_trial", "lost_too_often"]

log = logging.getLogger(__name__)
SpecT = TypeVar("SpecT", bound=BaseModel)


class LeaseHeld(Exception):
    """Another worker holds this trial's lease; try again after ``retry_in_s``."""

    def __init__(self, trial_id: str, retry_in_s: int):
        super().__init__(f"trial {trial_id} is being trained by another worker")
        self.retry_in_s = retry_in_s


def execute_trial(
    trial_id: str, payload: dict, rt: WorkerRuntime, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> Ending | None:
    """Run one delivery of ``trial_id``; how the trial ended, or None for a duplicate delivery.

    ``on_epoch_end`` is a study's pruning hook (see :class:`workers.training.train.TrainingContext`).
    """
    tracker = MlflowTracker(rt.mlflow, trial_id, log_model=rt.settings.log_model)
    spec, ending = admit(tracker, trial_id, payload, TrialSpec, rt, "trial")
    if spec is None:
        return ending

    lease = Lease(rt.redis, trial_id, rt.settings.lease_ttl_s)
    if not lease.acquire():
        raise LeaseHeld(trial_id, rt.settings.lease_ttl_s)
    with lease:
        attempt = count_attempt(rt, trial_id)
        if attempt > rt.settings.max_attempts:
            return _end(tracker, lost_too_often(attempt, rt.settings.max_attempts), rt.checkpoint_path(trial_id))
        if attempt > 1:
            log.warning("trial %s: attempt %d, resuming from its last checkpoint", trial_id, attempt)
        tracker.start(str(rt.device), attempt)
        ctx = TrainingContext(
            device=rt.device, data_root=rt.settings.data_root, checkpoint_path=rt.checkpoint_path(trial_id),
            should_cancel=lambda: bool(rt.redis.exists(cancel_key(trial_id))), check_every_steps=rt.settings.cancel_check_steps,
            on_epoch_end=on_epoch_end, on_setup=tracker.log_batches,
            cpu_memory_limit_bytes=rt.settings.cpu_memory_limit_mb * 2**20, gpu_memory_fraction=rt.settings.gpu_memory_fraction,
        )
        ending: Ending | None = None
        try:
            result = train_on_devices(spec, tracker, ctx, rt.devices_owned)
            if result.confusion is not None:
                tracker.log_confusion(result.confusion, result.class_names or [])
        except Exception as exc:
            ending = classify(exc)
            log.log(logging.ERROR if ending.outcome == "error" else logging.INFO, "trial %s ended %s: %s", trial_id, ending.outcome, ending.reason, exc_info=ending.outcome == "error")
        if ending is not None:
            if ending.outcome == "out_of_memory" and rt.device.type == "cuda":
                torch.cuda.empty_cache()  # the failed step's tensors died with its traceback: give their memory back
            return _end(tracker, ending, ctx.checkpoint_path)
        reason = f"trained {result.epochs_done} epochs; best val_accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}"
        return _end(tracker, Ending("FINISHED", "succeeded", reason), ctx.checkpoint_path)


def admit(tracker: MlflowTracker, run_id: str, payload: dict, spec_model: type[SpecT], rt: WorkerRuntime, what: str) -> tuple[SpecT | None, Ending | None]:
    """Decide whether a delivery of ``run_id`` is worth running: its validated spec, or None and how it ended.

    A run that does not exist or has already ended is a duplicate (no ending: skipped); a payload the
    worker refuses ends the run as ``error``; a cancel flag raised while queued ends it ``cancelled``.
    Raises MlflowException when MLflow is down, so Redis redelivers the message later.
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
        return None, _end(tracker, Ending("FAILED", "error", f"the worker refused the spec: {exc}"))
    if rt.redis.exists(cancel_key(run_id)):
        return None, _end(tracker, Ending("KILLED", "cancelled", "cancelled on request before it started"))
    return spec, None


def count_attempt(rt: WorkerRuntime, run_id: str) -> int:
    """Count one more start of ``run_id`` (kept as long as its message can be redelivered); the count."""
    attempt = int(rt.redis.incr(attempts_key(run_id)))
    rt.redis.expire(attempts_key(run_id), rt.settings.visibility_timeout_s * 4)
    return attempt


def lost_too_often(attempt: int, max_attempts: int) -> Ending:
    """The ending of a run started more than ``max_attempts`` times: its workers kept dying."""
    return Ending("FAILED", "worker_lost", f"its worker was lost {attempt - 1} times (max_attempts={max_attempts}); not retried again")


def _end(tracker: MlflowTracker, ending: Ending, checkpoint: Path | None = None) -> Ending:
    tracker.finish(ending)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return ending
