"""Configuration of a worker process, from ``CONVTUNE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from models.settings import SharedSettings

__all__ = ["WorkerSettings"]


class WorkerSettings(SharedSettings):
    """Settings of a worker, beside those it shares with the API (:class:`~models.settings.SharedSettings`); read once per process and passed to the code that needs them."""

    checkpoint_dir: Path = Field(default=Path(".convtune/checkpoints"), description="Per-epoch checkpoints, for resuming a redelivered trial.")
    lease_ttl_s: int = Field(default=60, ge=5, description="A lease not renewed for this long is free again.")
    # The reconciler (workers.reconciler): a sweep in every worker's main process, one at a time across hosts.
    reconcile_interval_s: float = Field(default=15.0, ge=0, description="Seconds between two sweeps of the reconciler (across all workers); 0 turns it off.")
    reconcile_grace_s: float = Field(
        default=30.0, ge=0,
        description="How long work must stay without a message before the reconciler re-sends or ends it (a run accepted a moment ago is left alone).",
    )
    max_attempts: int = Field(default=3, ge=1, description="Starts of one trial before it is failed as worker_lost.")
    cancel_check_steps: int = Field(default=50, ge=1, description="Training steps between two looks at the cancel flag.")
    log_model: bool = Field(default=True, description="Log each trained model as an MLflow pytorch model (pt2) in the run's model/ artifacts.")
    artifacts_destination: str | None = Field(
        default=None,
        description=(
            "The MLflow server's --artifacts-destination, when this worker can write there too (the same directory on one host, "
            "or the same object store): artifacts go straight there instead of one request to the server per file. "
            "'convtune up' sets it for the server it starts; unset: every file goes through the server."
        ),
    )
    # Tuning: batch_size 'auto' and data-parallel trials.
    cpu_memory_limit_mb: int = Field(default=2048, ge=16, description="What batch_size 'auto' may use for one training step on the CPU.")
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1, description="Share of a GPU's memory batch_size 'auto' may fill.")
    cpu_devices: int = Field(default=1, ge=1, le=64, description="Processes a trial with 'devices' > 1 may use on a CPU host (gloo).")
    # Threads (workers.training.threads): the host's usable cores divided between its training processes.
    host_training_processes: int = Field(
        default=1, ge=1, le=1024, description="Training processes sharing this host's cores (set by 'convtune worker' and 'convtune up'); each takes an equal share.",
    )
    torch_threads: int | None = Field(default=None, ge=1, le=1024, description="Intra-op threads of each training process; default: its share of the usable cores.")
    # What each run records beside its metrics (workers.trial.recording).
    system_metrics_interval_s: float = Field(
        default=10.0, ge=0,
        description=(
            "Seconds between two samples of MLflow's system metrics (CPU, memory, disk, network; GPUs with nvidia-ml-py) on each run, "
            "where psutil is installed; they start after one interval of training, so shorter trials pay nothing. 0 turns them off."
        ),
    )
    run_log_max_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest log artifact of a run (logs/trial.log); past it, the first half and the latest lines are kept.",
    )
    # Failures (workers.failures): infrastructure errors that escape a task are retried, never acked away.
    retry_backoff_s: int = Field(default=5, ge=1, description="Delay bound of the first retry after an infrastructure error; doubled per retry (full jitter).")
    retry_backoff_max_s: int = Field(default=300, ge=1, description="Largest delay bound between two retries.")
    retry_max: int = Field(
        default=30, ge=0,
        description="Retries after infrastructure errors (about an hour with the defaults) before the task gives up and ends its run as error.",
    )
    broker_timeout_s: float = Field(default=10.0, gt=0, description="Socket timeout of the workers' broker and Redis connections.")
    mlflow_timeout_s: int = Field(default=10, ge=1, description="How long one MLflow request may take (MLFLOW_HTTP_REQUEST_TIMEOUT, unless set).")
    mlflow_max_retries: int = Field(default=2, ge=0, description="Retries of one failed MLflow request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, unless set).")
    # Callbacks (workers.callbacks).
    callback_max_retries: int = Field(default=8, ge=0, description="Retries of a failed callback delivery, with exponential backoff.")
    callback_backoff_s: float = Field(default=2.0, gt=0, description="First retry delay; doubled per retry, at most callback_backoff_max_s.")
    callback_backoff_max_s: float = Field(default=600.0, gt=0)
    callback_timeout_s: float = Field(default=10.0, gt=0, description="How long one delivery waits for the receiver.")
    callback_resolve_timeout_s: float = Field(
        default=5.0, gt=0, description="How long a callback host's DNS lookup may take; past it the delivery is retried later, like a connection error.",
    )
