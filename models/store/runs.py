"""A convtune run's life in MLflow: its kinds, its tags, its statuses and how each maps to a client's.

A trial's id *is* its MLflow run id; a study's is its parent run's; a range test's is its own run's.
Every run is created SCHEDULED with its tags here, and ended here with exactly one outcome and reason.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["EXPERIMENT_KIND", "KIND", "TAG", "TERMINAL_STATUSES", "TrialOutcome", "client_status"]

# Every ended trial carries exactly one outcome; 'succeeded' is the only good one.
TrialOutcome = Literal[
    "succeeded", "diverged", "pruned", "out_of_memory", "timeout", "cancelled", "worker_lost", "invalid_data", "error",
    # a study trial whose sampled architecture cannot run on its input; one that reused a twin's result
    "infeasible", "duplicate",
]
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
    # An LR range test's result and progress (workers.trial.lr_finder).
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
