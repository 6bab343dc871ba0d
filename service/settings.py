"""Configuration of the API process, from ``CONVTUNE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ApiSettings"]


class ApiSettings(BaseSettings):
    """Settings of the API; built once in ``create_app`` and passed to whatever needs them."""

    model_config = SettingsConfigDict(env_prefix="CONVTUNE_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_ui_url: str | None = Field(default=None, description="Address people open the MLflow UI at; the tracking URI when unset.")
    experiment: str = "convtune"
    default_queue: Literal["gpu", "cpu"] = "gpu"
    visibility_timeout_s: int = Field(default=4 * 3600, ge=60, description="Must equal the workers' setting.")
    data_root: Path | None = Field(default=None, description="The workers' data root, when the API can see it: user data is checked at submit.")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_epochs: int = Field(default=1000, ge=1)
    page_size_max: int = 200

    @property
    def ui_url(self) -> str:
        return (self.mlflow_ui_url or self.mlflow_tracking_uri).rstrip("/")
