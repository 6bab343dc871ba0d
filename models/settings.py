"""The settings the API and the workers both read, declared once: the stores they meet in, the limits
both enforce, the timings that must agree, and how both log.

Each process keeps its own settings class (``service.api.settings.ApiSettings``,
``workers.settings.WorkerSettings``) that inherits :class:`SharedSettings` and adds only its own
fields; a value here must be set the same for both, or the two disagree about the same work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.callbacks import CallbackDestinations
from models.sealing import SecretKeySettings
from models.store.placement import StudyPlacement
from models.store.share import TeamPolicy

__all__ = ["SharedSettings"]


class SharedSettings(BaseSettings, CallbackDestinations, SecretKeySettings, StudyPlacement):
    """``CONVTUNE_*`` settings both processes read; subclassed once per process, never built on its own."""

    # hide_input_in_errors: a refused setting is logged at start-up without the values (URLs with passwords, tokens) beside it.
    model_config = SettingsConfigDict(env_prefix="CONVTUNE_", extra="ignore", hide_input_in_errors=True)

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="The broker, and the leases, slots and heartbeats beside it.")
    mlflow_tracking_uri: str = Field(default="http://127.0.0.1:5000", description="The tracking server, the system of record of every run.")
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
    data_root: Path | None = Field(
        default=None,
        description="Root that 'npz' and 'folder' data paths are relative to; on the API, where it can see the workers' data, user data is checked at submit.",
    )
    unserved_queue_s: int = Field(
        default=900, ge=0,
        description=(
            "How long a queue counts as served after its last worker's last beat: a submit to a queue unserved this long is a 422 (it would "
            "wait for ever), and the reconciler ends queued work left on it (outcome error). 0: the check is off and nothing is ended."
        ),
    )
    visibility_timeout_s: int = Field(default=4 * 3600, ge=60, description="Redis' visibility timeout of an unacked message: the last resort of a redelivery.")
    max_params: int = Field(default=200_000_000, ge=1, description="Largest trainable-parameter count a trial, or a study's sampled configuration, may have.")
    max_flops_per_sample: int = Field(
        default=50 * 10**9, ge=1, description="Largest forward FLOPs per sample a trial's network, or a study's sampled configuration, may have.",
    )
    fair_share: bool = Field(
        default=True,
        description=(
            "Share the workers between teams by weight (each team's work waits in queues of its own, fed to the workers as they free up); "
            "false: one queue per device kind, first come first served."
        ),
    )
    teams: dict[str, TeamPolicy] = Field(
        default_factory=dict,
        description=(
            'Per team: its weight in the fair share and its compute quotas, as JSON: {"vision": {"weight": 2, "device_seconds_per_day": 36000}}. '
            "A team not named has weight 1 and no quota."
        ),
    )
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
