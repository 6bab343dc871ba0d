"""Configuration of the API process, from ``CONVTUNE_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from models.data import RESERVED_TEAM_NAMES
from models.settings import SharedSettings
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


class ApiSettings(SharedSettings):
    """Settings of the API, beside those it shares with the workers (:class:`~models.settings.SharedSettings`); built once in ``create_app`` and passed to whatever needs them."""

    mlflow_ui_url: str | None = Field(default=None, description="Address people open the MLflow UI at; the tracking URI when unset.")
    default_queue: Literal["gpu", "cpu"] = "gpu"
    redis_timeout_s: float = Field(
        default=2.0, gt=0, le=30,
        description="Socket timeout of every Redis command and connection of the API (broker, idempotency, rate limits): a stalled Redis is a 503, not a hung request.",
    )
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_epochs: int = Field(default=1000, ge=1)
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
    # Auth, limits, observability, callbacks.
    auth_disabled: bool = Field(default=False, description="Serve without authentication (local stack and tests only); logged loudly at start-up.")
    auth_tokens: list[TokenConfig] = Field(default_factory=list, description="JSON list of {name, sha256, scopes}.")
    rate_limit: str = Field(default="600/minute", description="Per token (or client address when auth is off), every route but health and metrics.")
    submit_rate_limit: str = Field(default="60/minute", description="Per token, on each POST route; on top of rate_limit.")
    max_queued_trials_per_token: int = Field(default=200, ge=1, description="Queued trials one token may have at once; more is a 429.")
    max_trials_per_study: int = Field(default=1000, ge=1)
    max_parallelism: int = Field(default=32, ge=1, description="Trials of one study that may run at once.")
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=24 * 3600, description="How long an Idempotency-Key is remembered.")
    # Event streams (service.api.events): each open stream holds one of its process's gunicorn threads.
    events_max_streams: int = Field(
        default=2, ge=0,
        description=(
            "Event streams one API process serves at once; more answer 503 (clients then poll). Each holds a gunicorn thread "
            "(CONVTUNE_GUNICORN_THREADS) for its life: keep it below the threads, or nothing else is served. 0: no streams."
        ),
    )
    events_max_s: float = Field(default=600, gt=0, description="Longest one event stream stays open; the client reconnects with Last-Event-ID.")
    events_keepalive_s: float = Field(
        default=15, gt=0, le=120,
        description="A quiet stream sends a keep-alive comment this often, and reads the run's status from MLflow (an ending whose event was lost).",
    )

    @property
    def ui_url(self) -> str:
        return (self.mlflow_ui_url or self.mlflow_tracking_uri).rstrip("/")

