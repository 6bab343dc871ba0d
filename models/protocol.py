"""Names the API and the workers share: Celery task names and queues, MLflow tags, Redis keys.

Both sides import this torch-free module instead of each other, so neither process needs the
other's code to agree on the wire format.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "EXPERIMENT_KIND",
    "OUTCOMES",
    "QUEUES",
    "TERMINAL_STATUSES",
    "RETRIED_OUTCOMES",
    "TAG",
    "TASK_RUN_TRIAL",
    "TASK_STUDY_STEP",
    "TASK_LR_FIND",
    "KIND",
    "TASK_DELIVER_CALLBACK",
    "CALLBACK_QUEUE",
    "OUTCOME_COUNTS_KEY",
    "TrialOutcome",
    "TrialStatus",
    "cancel_key",
    "study_key",
    "client_status",
    "lease_key",
    "attempts_key",
    "celery_config",
]

TASK_RUN_TRIAL = "convtune.run_trial"
# A learning-rate range test (workers.lr_finder); its MLflow run is tagged TAG.KIND = KIND.LR_FINDER.
TASK_LR_FIND = "convtune.lr_find"
# One step of a study: run one of its trials, then send the next steps (workers.study).
TASK_STUDY_STEP = "convtune.study_step"
# Callbacks (a POST to the spec's callback_url when a trial or study ends) travel on their own
# queue, consumed by a light worker (workers.callback_app), so a slow receiver never holds a GPU.
TASK_DELIVER_CALLBACK = "convtune.deliver_callback"
CALLBACK_QUEUE = "callbacks"
# Redis hash: outcome -> how many trials ended with it (for /metrics).
OUTCOME_COUNTS_KEY = "convtune:stats:trials_by_outcome"
QUEUES = ("gpu", "cpu")

TrialStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# Every ended trial carries exactly one outcome; 'succeeded' is the only good one.
TrialOutcome = Literal[
    "succeeded", "diverged", "pruned", "out_of_memory", "timeout", "cancelled", "worker_lost", "invalid_data", "error",
    # a study trial whose sampled architecture cannot run on its input; one that reused a twin's result
    "infeasible", "duplicate",
]
OUTCOMES: tuple[str, ...] = TrialOutcome.__args__  # type: ignore[attr-defined]
# Outcomes after which the message is redelivered and the trial resumed (capped by max attempts).
# Every other outcome is final: the same spec would end the same way (docs/tuning.md, "Outcomes").
RETRIED_OUTCOMES = ("worker_lost",)
# MLflow run statuses of a run that has ended: a message for such a run is a duplicate.
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

EXPERIMENT_KIND = "custom_model_development"


class KIND:
    """Values of TAG.KIND: what a convtune MLflow run is."""

    TRIAL = "trial"
    STUDY = "study"
    LR_FINDER = "lr_finder"


class TAG:
    """MLflow tag keys convtune writes on runs."""

    KIND = "convtune.kind"  # "trial", "study" or "lr_finder" (see KIND)
    OUTCOME = "convtune.outcome"
    REASON = "convtune.reason"
    SPEC = "convtune.spec"  # the validated TrialSpec as JSON
    PARAMS_COUNT = "convtune.params_count"
    FLOPS = "convtune.flops_per_sample"
    QUEUE = "convtune.queue"
    ATTEMPTS = "convtune.attempts"
    EPOCHS_DONE = "convtune.epochs_done"
    DEVICE = "convtune.device"
    STUDY_ID = "convtune.study_id"
    ACCEPTED_AT = "convtune.accepted_at"  # ISO time the API accepted it
    STARTED_AT = "convtune.started_at"  # ISO time a worker first started it
    # An LR range test's result and progress (workers.lr_finder).
    SUGGESTED_LR = "convtune.suggested_lr"
    LARGEST_STABLE_LR = "convtune.largest_stable_lr"
    STEPS_DONE = "convtune.steps_done"
    OWNER = "convtune.owner"  # the name of the API token that submitted it
    RUN_NAME = "mlflow.runName"
    PARENT = "mlflow.parentRunId"
    EXPERIMENT_KIND = "mlflow.experimentKind"


def client_status(mlflow_status: str, outcome: str | None) -> str:
    """The status a client sees (``queued`` ... ``failed``) of a run's MLflow status and outcome tag."""
    by_mlflow = {"SCHEDULED": "queued", "RUNNING": "running", "KILLED": "cancelled"}
    if mlflow_status in by_mlflow:
        return by_mlflow[mlflow_status]
    if mlflow_status == "FINISHED":
        return "pruned" if outcome == "pruned" else "succeeded"
    return "failed"


def study_key(study_id: str) -> str:
    """Redis hash of a study's trial slots: budget, parallelism, claimed, in flight, stop reason."""
    return f"convtune:study:{study_id}"


def cancel_key(trial_id: str) -> str:
    """Redis key whose presence asks the training loop of ``trial_id`` to stop."""
    return f"convtune:trial:{trial_id}:cancel"


def lease_key(trial_id: str) -> str:
    """Redis key held by the one worker executing ``trial_id`` (renewed while it trains)."""
    return f"convtune:trial:{trial_id}:lease"


def attempts_key(trial_id: str) -> str:
    """Redis counter of how many times a worker started ``trial_id``."""
    return f"convtune:trial:{trial_id}:attempts"


def celery_config(broker_url: str, visibility_timeout_s: int) -> dict:
    """Celery settings the API (sender) and the workers must agree on.

    JSON only; late acks so a trial whose worker dies is redelivered; the same visibility timeout
    on both sides, since Redis redelivers any message unacknowledged for that long (celery#5935).
    Execution is idempotent through a per-trial lease, so a second delivery is harmless.
    """
    transport = {"visibility_timeout": visibility_timeout_s}
    return {
        "broker_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "gpu",
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }
