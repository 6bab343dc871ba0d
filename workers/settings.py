"""Configuration of a worker process, from ``CONVTUNE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["WorkerSettings"]


class WorkerSettings(BaseSettings):
    """Settings of a worker; read once per process and passed to the code that needs them."""

    model_config = SettingsConfigDict(env_prefix="CONVTUNE_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    visibility_timeout_s: int = Field(default=4 * 3600, ge=60, description="Must equal the API's setting.")
    data_root: Path | None = Field(default=None, description="Root that 'npz' and 'folder' data paths are relative to.")
    checkpoint_dir: Path = Field(default=Path(".convtune/checkpoints"), description="Per-epoch checkpoints, for resuming a redelivered trial.")
    lease_ttl_s: int = Field(default=60, ge=5, description="A lease not renewed for this long is free again.")
    max_attempts: int = Field(default=3, ge=1, description="Starts of one trial before it is failed as worker_lost.")
    cancel_check_steps: int = Field(default=50, ge=1, description="Training steps between two looks at the cancel flag.")
    log_model: bool = Field(default=True, description="Log the trained model with mlflow.pytorch.log_model.")
    # Tuning (issue 4): batch_size 'auto' and data-parallel trials.
    cpu_memory_limit_mb: int = Field(default=2048, ge=16, description="What batch_size 'auto' may use for one training step on the CPU.")
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1, description="Share of a GPU's memory batch_size 'auto' may fill.")
    cpu_devices: int = Field(default=1, ge=1, le=64, description="Processes a trial with 'devices' > 1 may use on a CPU host (gloo).")
    study_storage: str = Field(
        default=".convtune/studies.journal",
        description="Optuna storage of studies, the same for the API and every worker: a journal file path (one host) or a database URL (postgresql://...).",
    )
    # Callbacks and logs (issue 5).
    callback_secret: str | None = Field(default=None, description="HMAC-SHA256 key that signs callbacks; unsigned (and a warning) when unset.")
    callback_max_retries: int = Field(default=8, ge=0, description="Retries of a failed callback delivery, with exponential backoff.")
    callback_backoff_s: float = Field(default=2.0, gt=0, description="First retry delay; doubled per retry, at most callback_backoff_max_s.")
    callback_backoff_max_s: float = Field(default=600.0, gt=0)
    callback_timeout_s: float = Field(default=10.0, gt=0, description="How long one delivery waits for the receiver.")
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
