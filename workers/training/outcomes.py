"""How a trial ends: the exceptions that carry an outcome out of training, and :func:`classify`.

    TrialStopped            the loop stopped the trial on purpose
     +-- Cancelled          cancelled    the cancel flag was raised
     +-- TimedOut           timeout      past the spec's time_limit_s
     +-- Diverged           diverged     the loss blew up (learning rate too high?)
     +-- Pruned             pruned       a study's pruner stopped it early
     +-- Superseded         (none)       this worker lost the trial's lease: another one
                                         resumes it, so this one stops without recording anything

Any other exception is classified by :func:`classify`: unusable data is ``invalid_data``, a CUDA
or host out-of-memory is ``out_of_memory``, anything else ``error`` with its type and message.
``worker_lost`` is decided by the execution wrapper when a trial has been started too often.
Each outcome's MLflow status is the outcome table's (:mod:`models.spec.outcomes`), never written here.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.data.sets import InvalidData
from models.spec.outcomes import OUTCOMES
from models.spec.outcomes import outcome as find_outcome
from workers.errors import WorkerError

__all__ = ["Cancelled", "Diverged", "Ending", "Pruned", "Superseded", "TimedOut", "TrialStopped", "classify"]


@dataclass(frozen=True)
class Ending:
    """How a run ends in MLflow: its status, convtune's outcome tag and a reason for a person."""

    mlflow_status: str
    outcome: str
    reason: str

    @classmethod
    def of(cls, outcome: str, reason: str) -> Ending:
        """The ending with ``outcome`` and that outcome's MLflow status; raises UnknownOutcome (a KeyError) for a name the table lacks."""
        return cls(find_outcome(outcome).mlflow_status, outcome, reason)


class TrialStopped(WorkerError):
    """Base of the deliberate stops; each subclass names its outcome, and takes that outcome's MLflow status."""

    outcome = "error"
    mlflow_status = OUTCOMES[outcome].mlflow_status

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Cancelled(TrialStopped):
    """The trial's cancel flag was raised."""

    outcome = "cancelled"
    mlflow_status = OUTCOMES[outcome].mlflow_status


class TimedOut(TrialStopped):
    """The trial ran past its wall-clock limit."""

    outcome = "timeout"
    mlflow_status = OUTCOMES[outcome].mlflow_status


class Diverged(TrialStopped):
    """The training loss became non-finite or blew up."""

    outcome = "diverged"
    mlflow_status = OUTCOMES[outcome].mlflow_status


class Pruned(TrialStopped):
    """A study's pruner judged the trial not worth finishing."""

    outcome = "pruned"
    mlflow_status = OUTCOMES[outcome].mlflow_status


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
        return Ending.of("invalid_data", str(exc))
    if _is_oom(exc):
        return Ending.of("out_of_memory", f"ran out of memory ({type(exc).__name__}: {str(exc)[:300]}); try a smaller batch_size or model")
    message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
    return Ending.of("error", f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
