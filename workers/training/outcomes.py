"""How a trial ends: the fixed set of outcomes and the exceptions that carry them out of training.

    TrialStopped            the loop stopped the trial on purpose
     +-- Cancelled          KILLED   cancelled    the cancel flag was raised
     +-- TimedOut           FAILED   timeout      past the spec's time_limit_s
     +-- Diverged           FAILED   diverged     the loss blew up (learning rate too high?)
     +-- Pruned             FINISHED pruned       a study's pruner stopped it early
     +-- Superseded         (none)                this worker lost the trial's lease: another one
                                                  resumes it, so this one stops without recording anything

Any other exception is classified by :func:`classify`: unusable data is ``invalid_data``, a CUDA
or host out-of-memory is ``out_of_memory``, anything else ``error`` with its type and message.
``worker_lost`` is decided by the execution wrapper when a trial has been started too often.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.data.sets import InvalidData

__all__ = ["Cancelled", "Diverged", "Ending", "Pruned", "Superseded", "TimedOut", "TrialStopped", "classify"]


@dataclass(frozen=True)
class Ending:
    """How a run ends in MLflow: its status, convtune's outcome tag and a reason for a person."""

    mlflow_status: str
    outcome: str
    reason: str


class TrialStopped(Exception):
    """Base of the deliberate stops; each subclass names its MLflow status and outcome."""

    mlflow_status = "FAILED"
    outcome = "error"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Cancelled(TrialStopped):
    """The trial's cancel flag was raised."""

    mlflow_status, outcome = "KILLED", "cancelled"


class TimedOut(TrialStopped):
    """The trial ran past its wall-clock limit."""

    mlflow_status, outcome = "FAILED", "timeout"


class Diverged(TrialStopped):
    """The training loss became non-finite or blew up."""

    mlflow_status, outcome = "FAILED", "diverged"


class Pruned(TrialStopped):
    """A study's pruner judged the trial not worth finishing."""

    mlflow_status, outcome = "FINISHED", "pruned"


class Superseded(TrialStopped):
    """This worker no longer holds the trial's lease; the run is another worker's to write and end."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - workers always have torch
        return False
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def classify(exc: BaseException) -> Ending:
    """The ending of a trial that raised ``exc``."""
    if isinstance(exc, TrialStopped):
        return Ending(exc.mlflow_status, exc.outcome, exc.reason)
    if isinstance(exc, InvalidData):
        return Ending("FAILED", "invalid_data", str(exc))
    if _is_oom(exc):
        return Ending("FAILED", "out_of_memory", f"ran out of memory ({type(exc).__name__}: {str(exc)[:300]}); try a smaller batch_size or model")
    message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
    return Ending("FAILED", "error", f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
