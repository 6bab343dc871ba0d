"""What the API answers with, named by role (the request body is :class:`models.spec.trial.TrialSpec`)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from models.spec.outcomes import describe_outcomes

__all__ = ["PageToken", "CancelPath", "Health", "TrialAccepted", "TrialList", "TrialListQuery", "TrialPath", "TrialPublic"]

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


class TrialPath(BaseModel):
    trial_id: str = Field(description="The trial's id, which is its MLflow run id.")


CancelPath = TrialPath


class TrialListQuery(BaseModel):
    status: Status | None = Field(default=None, description="Only trials in this status.")
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


class TrialList(BaseModel):
    items: list[TrialPublic]
    next_page_token: str | None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
