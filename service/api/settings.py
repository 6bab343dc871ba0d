"""Configuration of the API process, from ``CONVTUNE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.callbacks import CallbackDestinations
from models.data import RESERVED_TEAM_NAMES
from models.sealing import SecretKeySettings
from models.store.placement import StudyPlacement
from models.store.teams import TEAM_NAME

__all__ = ["ApiSettings", "TokenConfig"]

Scope = Literal["read", "read-all", "submit", "admin"]


class TokenConfig(BaseModel):
    """One API token as configured: its name, its team, the SHA-256 of the token (never the token) and its scopes."""

    name: str = Field(min_length=1, max_length=64, pattern=TEAM_NAME, description="Who holds it; shown in logs and metrics.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token; `convtune token` prints one.")
    scopes: list[Scope] = Field(
        min_length=1,
        description="read: GET its team's work; read-all: GET every team's work (dashboards); submit: create, cancel and extend its team's work; admin: everything.",
    )
    team: str | None = Field(
        default=None, pattern=TEAM_NAME,
        description="The team it acts for: what it submits is the team's, and every token of the team reads and changes it. Unset: a team of its own, named as the token.",
    )

    @property
    def team_name(self) -> str:
        return self.team or self.name

    @model_validator(mode="after")
    def _team_has_a_data_folder(self) -> TokenConfig:
        # A team reads data under <data_root>/<team>/ (models.data.roots): 'shared' is every team's folder.
        if self.team_name in RESERVED_TEAM_NAMES:
            raise ValueError(f"no team may be named {self.team_name!r} (reserved: {', '.join(sorted(RESERVED_TEAM_NAMES))}); set another team")
        return self


class ApiSettings(BaseSettings, CallbackDestinations, SecretKeySettings, StudyPlacement):
    """Settings of the API; built once in ``create_app`` and passed to whatever needs them."""

    # hide_input_in_errors: a refused setting is logged at start-up without the values (URLs with passwords, tokens) beside it.
    model_config = SettingsConfigDict(env_prefix="CONVTUNE_", extra="ignore", hide_input_in_errors=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_ui_url: str | None = Field(default=None, description="Address people open the MLflow UI at; the tracking URI when unset.")
    mlflow_team_access: bool = Field(
        default=False,
        description=(
            "MLflow runs basic-auth with default_permission NO_PERMISSIONS: grant each team's MLflow role (convtune-team-<team>) "
            "READ on the team's experiment and registered models (docs/mlflow-access.md). Off for the one-host stack (no MLflow users)."
        ),
    )
    experiment: str = Field(
        default="convtune", pattern=r"^[^/']{1,200}$",
        description="The MLflow experiment convtune records runs in; with authentication on, each team's go in '{experiment}/{team}'.",
    )
    default_queue: Literal["gpu", "cpu"] = "gpu"
    unserved_queue_s: int = Field(
        default=900, ge=0,
        description=(
            "A submit to a queue no worker has served (by its heartbeat) for this long is a 422: it would wait for ever. "
            "0 turns the check off. Must equal the workers' setting (their reconciler ends work left on such a queue)."
        ),
    )
    visibility_timeout_s: int = Field(default=4 * 3600, ge=60, description="Must equal the workers' setting.")
    redis_timeout_s: float = Field(
        default=2.0, gt=0, le=30,
        description="Socket timeout of every Redis command and connection of the API (broker, idempotency, rate limits): a stalled Redis is a 503, not a hung request.",
    )
    data_root: Path | None = Field(default=None, description="The workers' data root, when the API can see it: user data is checked at submit.")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_epochs: int = Field(default=1000, ge=1)
    max_params: int = Field(default=200_000_000, ge=1, description="Largest trainable-parameter count a trial may have.")
    max_flops_per_sample: int = Field(default=50 * 10**9, ge=1, description="Largest forward FLOPs per sample a trial's network may have.")
    max_dataset_bytes: int = Field(
        default=2 * 2**30, ge=2**20,
        description="Largest generated data set (float32 images in a worker's memory) a trial may ask for; building one takes about 3x this at peak.",
    )
    callback_hosts: list[str] | None = Field(
        default=None,
        description=(
            "Hosts a callback_url may name: exact names or '*.suffix' patterns (JSON list). Unset: any host, "
            "which lets a token holder make the workers POST to internal addresses; set it in production."
        ),
    )
    page_size_max: int = 200
    # Issue 5: auth, limits, observability, callbacks.
    auth_disabled: bool = Field(default=False, description="Serve without authentication (local stack and tests only); logged loudly at start-up.")
    auth_tokens: list[TokenConfig] = Field(default_factory=list, description="JSON list of {name, sha256, scopes}.")
    rate_limit: str = Field(default="600/minute", description="Per token (or client address when auth is off), every route but health and metrics.")
    submit_rate_limit: str = Field(default="60/minute", description="Per token, on each POST route; on top of rate_limit.")
    max_queued_trials_per_token: int = Field(default=200, ge=1, description="Queued trials one token may have at once; more is a 429.")
    max_trials_per_study: int = Field(default=1000, ge=1)
    max_parallelism: int = Field(default=32, ge=1, description="Trials of one study that may run at once.")
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=24 * 3600, description="How long an Idempotency-Key is remembered.")
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    @property
    def ui_url(self) -> str:
        return (self.mlflow_ui_url or self.mlflow_tracking_uri).rstrip("/")

