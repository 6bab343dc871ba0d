"""Configuration of a worker process, from ``CONVTUNE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

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
