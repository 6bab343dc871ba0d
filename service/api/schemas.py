"""What the API answers with, named by role (the request body is :class:`models.spec.trial.TrialSpec`)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from models.spec.outcomes import describe_outcomes
from models.store.teams import TEAM_NAME

__all__ = [
    "CancelPath", "Health", "ListFilters", "PageToken", "TrialAccepted", "TrialList", "TrialListQuery", "TrialPath", "TrialPublic", "page_token",
]

Status = Literal["queued", "running", "succeeded", "pruned", "failed", "cancelled"]
# An ended run's outcome (null while it runs), each with its meaning: the outcome table's own words.
OUTCOME_DESCRIPTION = f"How it ended (null until it has): {describe_outcomes()}."


def _mlflow_page_token(token: str) -> str:
    # MLflow's tokens are base64 of {"offset": N}; a forged one can make its server answer 500, so
    # anything else is refused here as the client's error (422) rather than passed on.
    try:
        offset = json.loads(base64.b64decode(token, validate=True))["offset"]
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise ValueError("not a page token this service gave out; start again without it") from exc
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= 10**9:
        raise ValueError("not a page token this service gave out; start again without it")
    return token


PageToken = Annotated[str, Field(max_length=2000, description="From the previous page's next_page_token."), AfterValidator(_mlflow_page_token)]


def page_token(offset: int) -> str:
    """A page token in the same form as MLflow's (so every list pages alike): where the next page starts."""
    return base64.b64encode(json.dumps({"offset": offset}).encode()).decode()


def page_offset(token: str | None) -> int:
    """The offset a page token (validated by :data:`PageToken`) points at; 0 without one."""
    return int(json.loads(base64.b64decode(token))["offset"]) if token else 0


class ListFilters(BaseModel):
    """The filters every list of runs takes (trials, studies): each narrows what the token may read anyway."""

    team: str | None = Field(default=None, pattern=TEAM_NAME, description="Only this team's work (a team's token sees its own team's only).")
    owner: str | None = Field(default=None, pattern=TEAM_NAME, description="Only what this API token (its name) submitted.")
    tag: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}=[^'\\]{0,500}$",
        description="Only runs whose user tag has this value, as KEY=VALUE (the spec's tags).",
    )
    since: datetime | None = Field(default=None, description="Only work accepted at or after this time (ISO 8601, or Unix seconds).")
    until: datetime | None = Field(default=None, description="Only work accepted before this time (ISO 8601, or Unix seconds).")


class TrialPath(BaseModel):
    trial_id: str = Field(description="The trial's id, which is its MLflow run id.")


CancelPath = TrialPath


class TrialListQuery(ListFilters):
    status: Status | None = Field(default=None, description="Only trials in this status.")
    study: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$", description="Only this study's trials (its id).")
    limit: int = Field(default=50, ge=1, le=200)
    page_token: PageToken | None = None


class TrialAccepted(BaseModel):
    """The answer to an accepted trial (202): where to follow it."""

    id: str
    status: Status
    name: str
    queue: str
    url: str = Field(description="This trial in the API.")
    mlflow_url: str = Field(description="This trial's run in the MLflow UI.")
    params_count: int | None = Field(description="Trainable parameters; null when the data's shape is only known to workers.")
    flops_per_sample: int | None = Field(description="Forward FLOPs per sample (2 x multiply-accumulates of conv and linear layers).")


class BestMetric(BaseModel):
    value: float
    epoch: int


class TrialPublic(BaseModel):
    """A trial as a client sees it."""

    id: str
    name: str | None
    status: Status
    outcome: str | None = Field(description=OUTCOME_DESCRIPTION)
    reason: str | None = Field(description="Why it ended that way, for a person.")
    queue: str | None
    epochs_done: int
    epochs: int | None
    metrics: dict[str, float] = Field(description="The latest value of each metric.")
    best: dict[str, BestMetric] = Field(description="Best val_accuracy (highest) and val_loss (lowest) with their epoch.")
    params_count: int | None
    flops_per_sample: int | None
    timings: dict[str, Any]
    spec: dict[str, Any] | None
    mlflow_url: str
    model_uri: str | None = Field(
        default=None,
        description="Its trained model, an MLflow logged model (`models:/<id>`): raw images in, class probabilities and labels out "
        "(docs/models.md). None until the trial ends with a model.",
    )


class TrialList(BaseModel):
    items: list[TrialPublic]
    next_page_token: str | None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
