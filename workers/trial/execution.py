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
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import redis
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ValidationError

from models.store.keys import attempts_key, cancel_key
from models.store.runs import TERMINAL_STATUSES
from models.spec.trial import TrialSpec
from workers.trial.lease import Lease
from workers.training.outcomes import Ending, classify
from workers.training.parallel import run_on_devices
from workers.settings import WorkerSettings
from workers.trial.tracking import MlflowTracker
from workers.training.train import TrialContext

__all__ = ["LeaseHeld", "WorkerRuntime", "admit", "count_attempt", "execute_trial", "lost_too_often"]

log = logging.getLogger(__name__)
SpecT = TypeVar("SpecT", bound=BaseModel)


class LeaseHeld(Exception):
    """Another worker holds this trial's lease; try again after ``retry_in_s``."""

    def __init__(self, trial_id: str, retry_in_s: int):
        super().__init__(f"trial {trial_id} is being trained by another worker")
        self.retry_in_s = retry_in_s


class WorkerRuntime:
    """One worker process's settings, clients and device."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.mlflow = MlflowClient(settings.mlflow_tracking_uri)
        # log_model only exists in MLflow's fluent API, which reads the process-wide tracking URI.
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A worker owns the GPUs it sees; on a CPU host, the processes it may spawn for one trial.
        self.devices_owned = torch.cuda.device_count() if self.device.type == "cuda" else settings.cpu_devices

    def warm_up(self) -> None:
        """Run a first optimizer step: it imports torch._dynamo (~1 s) once per process, not per trial."""
        t0 = time.perf_counter()
        param = torch.nn.Parameter(torch.zeros(1, device=self.device))
        optimizer = torch.optim.AdamW([param])
        param.sum().backward()
        optimizer.step()
        log.info("worker warmed up on %s in %.2fs", self.device, time.perf_counter() - t0)

    def checkpoint_path(self, trial_id: str) -> Path:
        return self.settings.checkpoint_dir / f"{trial_id}.pt"


def execute_trial(trial_id: str, payload: dict, rt: WorkerRuntime, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> str:
    """Run one delivery of ``trial_id``; the outcome, or ``skipped`` for a duplicate.

    ``on_epoch_end`` is a study's pruning hook (see :class:`workers.training.train.TrialContext`).
    """
    tracker = MlflowTracker(rt.mlflow, trial_id, log_model=rt.settings.log_model)
    spec, outcome = admit(tracker, trial_id, payload, TrialSpec, rt, "trial")
    if spec is None:
        return outcome

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
        ctx = TrialContext(
            device=rt.device, data_root=rt.settings.data_root, checkpoint_path=rt.checkpoint_path(trial_id),
            should_cancel=lambda: bool(rt.redis.exists(cancel_key(trial_id))), check_every_steps=rt.settings.cancel_check_steps,
            on_epoch_end=on_epoch_end, on_setup=tracker.log_tags,
            cpu_memory_limit_bytes=rt.settings.cpu_memory_limit_mb * 2**20, gpu_memory_fraction=rt.settings.gpu_memory_fraction,
        )
        ending: Ending | None = None
        try:
            result = run_on_devices(spec, tracker, ctx, rt.devices_owned)
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


def admit(tracker: MlflowTracker, run_id: str, payload: dict, spec_model: type[SpecT], rt: WorkerRuntime, what: str) -> tuple[SpecT | None, str]:
    """Decide whether a delivery of ``run_id`` is worth running: its validated spec, or None and its outcome.

    A run that does not exist or has already ended is a duplicate (``skipped``); a payload the
    worker refuses ends the run as ``error``; a cancel flag raised while queued ends it ``cancelled``.
    Raises MlflowException when MLflow is down, so Redis redelivers the message later.
    """
    try:
        status = tracker.status()
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            log.error("%s %s has no MLflow run; dropping its message", what, run_id)
            return None, "skipped"
        raise
    if status in TERMINAL_STATUSES:
        log.info("%s %s already ended (%s); duplicate delivery skipped", what, run_id, status)
        return None, "skipped"
    try:
        spec = spec_model.model_validate(payload)
    except ValidationError as exc:
        return None, _end(tracker, Ending("FAILED", "error", f"the worker refused the spec: {exc}"))
    if rt.redis.exists(cancel_key(run_id)):
        return None, _end(tracker, Ending("KILLED", "cancelled", "cancelled on request before it started"))
    return spec, ""


def count_attempt(rt: WorkerRuntime, run_id: str) -> int:
    """Count one more start of ``run_id`` (kept as long as its message can be redelivered); the count."""
    attempt = int(rt.redis.incr(attempts_key(run_id)))
    rt.redis.expire(attempts_key(run_id), rt.settings.visibility_timeout_s * 4)
    return attempt


def lost_too_often(attempt: int, max_attempts: int) -> Ending:
    """The ending of a run started more than ``max_attempts`` times: its workers kept dying."""
    return Ending("FAILED", "worker_lost", f"its worker was lost {attempt - 1} times (max_attempts={max_attempts}); not retried again")


def _end(tracker: MlflowTracker, ending: Ending, checkpoint: Path | None = None) -> str:
    tracker.finish(ending)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return ending.outcome
