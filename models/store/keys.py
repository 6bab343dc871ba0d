"""Redis key names the API and the workers share. Redis only coordinates: nothing here is the only
copy of what a client submitted (MLflow and the Optuna storage are the records)."""

from __future__ import annotations

__all__ = [
    "OUTCOME_COUNTS_KEY", "RECONCILER_COUNTS_KEY", "RECONCILER_LOCK_KEY", "RECONCILER_SUSPECTS_KEY",
    "attempts_key", "cancel_key", "events_key", "fence_key", "lease_key", "queued_key", "resent_key", "slot_lease_id", "study_key",
]

# Redis hash: outcome -> how many trials ended with it (for /metrics).
OUTCOME_COUNTS_KEY = "convtune:stats:trials_by_outcome"
# Redis hash: "{kind}:{action}" -> how many times the reconciler acted (for /metrics).
RECONCILER_COUNTS_KEY = "convtune:stats:reconciler_actions"
# The reconciler's lock (one sweep at a time, across hosts) and what it found stranded since when.
RECONCILER_LOCK_KEY = "convtune:reconciler:lock"
RECONCILER_SUSPECTS_KEY = "convtune:reconciler:suspects"


def queued_key(owner: str) -> str:
    """Redis set of the runs ``owner`` had accepted since its work was last counted in MLflow (an upper bound of its queue)."""
    return f"convtune:queued:{owner}"


def resent_key(task_id: str) -> str:
    """Redis key set (with a TTL) when the reconciler re-sent ``task_id``'s message."""
    return f"convtune:reconciler:resent:{task_id}"


def study_key(study_id: str) -> str:
    """Redis hash of a study's trial slots: budget, parallelism, claimed, in flight, stop reason."""
    return f"convtune:study:{study_id}"


def cancel_key(trial_id: str) -> str:
    """Redis key whose presence asks the training loop of ``trial_id`` to stop."""
    return f"convtune:trial:{trial_id}:cancel"


def lease_key(trial_id: str) -> str:
    """Redis key held by the one worker executing ``trial_id`` (renewed while it trains)."""
    return f"convtune:trial:{trial_id}:lease"


def slot_lease_id(study_id: str, slot: int) -> str:
    """The lease name of a study slot's start (its key is ``lease_key`` of it), held by the step that starts the slot's trial.

    A slot whose step died before it recorded its trial can be delivered again at once: the second
    delivery waits on this lease instead of starting a second trial.
    """
    return f"{study_id}-slot-{slot}"


def events_key(run_id: str) -> str:
    """Redis stream of what happened to ``run_id`` (a trial, a study, a range test), for clients that follow it (models.store.events)."""
    return f"convtune:events:{run_id}"


def fence_key(trial_id: str) -> str:
    """Redis counter taken with each lease of ``trial_id``: a later holder's is higher (workers.trial.lease)."""
    return f"convtune:trial:{trial_id}:fence"


def attempts_key(trial_id: str) -> str:
    """Redis counter of how many times a worker started ``trial_id``."""
    return f"convtune:trial:{trial_id}:attempts"
