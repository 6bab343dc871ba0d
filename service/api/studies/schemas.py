"""What /studies answers with, named by role (the request body is :class:`models.spec.study.StudySpec`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.api.schemas import OUTCOME_DESCRIPTION, ListFilters, PageToken, Status

__all__ = [
    "StudyAccepted", "StudyBest", "StudyExtend", "StudyFrontTrial", "StudyList", "StudyListQuery", "StudyPath", "StudyProgress",
    "StudyPublic", "StudyTrial", "StudyTrialList", "StudyTrialQuery",
]

StudyState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class StudyPath(BaseModel):
    study_id: str = Field(description="The study's id, which is its MLflow parent run id.")


class StudyListQuery(ListFilters):
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Field(default=None, description="Only studies in this state.")
    limit: int = Field(default=20, ge=1, le=200)
    page_token: PageToken | None = None


class StudyTrialQuery(BaseModel):
    status: Status | None = Field(default=None, description="Only trials in this status (the same words as /trials).")
    limit: int = Field(default=100, ge=1, le=1000)
    page_token: PageToken | None = None
    offset: int = Field(default=0, ge=0, description="Where to start without a page_token (kept for older clients: prefer page_token).")
    state: Literal["running", "complete", "pruned", "fail", "waiting"] | None = Field(
        default=None, description="Only trials in this Optuna state (kept for older clients: prefer status).",
    )


class StudyExtend(BaseModel):
    """More trials for a running or ended study, optionally starting with known configurations."""

    model_config = {"extra": "forbid"}

    n_trials: int = Field(default=0, ge=0, le=10_000, description="Trials to add (at least as many as warm_start's).")
    warm_start: list[dict[str, Any]] = Field(default_factory=list, max_length=1000, description="Configurations (search-space key -> value) to try first.")


class StudyAccepted(BaseModel):
    """The answer to an accepted study (202): where to follow it."""

    id: str
    state: StudyState
    name: str
    n_trials: int
    parallelism: int
    queue: str
    storage: str = Field(description="Kind of Optuna storage the study lives in: journal or postgresql.")
    url: str = Field(description="This study in the API.")
    trials_url: str
    mlflow_url: str = Field(description="The study's parent run in the MLflow UI (its trials are nested under it).")


class StudyProgress(BaseModel):
    finished: int = Field(description="Trials that ended, whatever their outcome.")
    running: int
    n_trials: int = Field(description="The budget (grows with /extend).")
    fraction: float
    epochs_trained: int
    elapsed_s: float | None
    timeout_s: float | None
    stopped: str | None = Field(description="Why no more trials start early: cancelled, target or timeout.")


class StudyBest(BaseModel):
    """The study's chosen trial: the best by its objective, or the one its selection rule picks from the front."""

    number: int
    trial_id: str | None = Field(description="The chosen trial's id (its MLflow child run id).")
    value: float = Field(description="Its (first) objective's value.")
    values: dict[str, float] = Field(description="Each objective's value, by metric.")
    rule: str = Field(description="The rule that chose it: best <metric>, or the knee of the front, with register_as's where.")
    params: dict[str, Any]
    mlflow_url: str | None
    model_uri: str | None = Field(
        default=None, description="Its trained model, an MLflow logged model (`models:/<id>`): raw images in, class probabilities and labels out (docs/models.md). "
        "Shown by GET /studies/{id}, not in lists.",
    )


class StudyFrontTrial(BaseModel):
    """A trial on the Pareto front: no other trial within the budgets is as good on every objective and better on one."""

    number: int
    trial_id: str | None
    values: dict[str, float] = Field(description="Each objective's value, by metric.")
    params: dict[str, Any]
    mlflow_url: str | None


class RegisteredModel(BaseModel):
    name: str
    version: str
    alias: str


class StudyPublic(BaseModel):
    """A study as a client sees it."""

    id: str
    name: str | None
    state: StudyState
    reason: str | None = Field(description="Why it ended that way, for a person.")
    objective: dict[str, str] = Field(description="The (first) objective.")
    objectives: list[dict[str, str]] = Field(description="Every objective, in order (one unless the study has several).")
    constraints: list[str] = Field(description="The study's budgets, e.g. 'flops_per_sample <= 2,000,000'.")
    sampler: str
    pruner: str
    parallelism: int
    queue: str | None
    counts: dict[str, int] = Field(description="Trials per outcome (succeeded, pruned, diverged, ...), plus running and waiting.")
    diverged_lrs: list[float] = Field(
        default_factory=list, description="optim.lr of each diverged trial (before any lr_scaling), lowest first: where the search found the LR too high.",
    )
    progress: StudyProgress
    best: StudyBest | None
    front: list[StudyFrontTrial] = Field(description="With several objectives, the Pareto front of the trials within the budgets, best first objective first; else [].")
    registered_model: RegisteredModel | None
    timings: dict[str, Any]
    spec: dict[str, Any]
    url: str
    trials_url: str
    mlflow_url: str


class StudyTrial(BaseModel):
    number: int
    trial_id: str | None = Field(description="Its MLflow child run id (also a /trials id).")
    name: str | None
    status: Status = Field(description="The same words as a trial's status: queued, running, succeeded, pruned, failed, cancelled.")
    state: str = Field(description="Optuna's state: running, complete, pruned, fail, waiting.")
    outcome: str | None = Field(description=OUTCOME_DESCRIPTION)
    reason: str | None
    value: float | None = Field(description="Its (first) objective's value.")
    values: dict[str, float] | None = Field(default=None, description="Each objective's value, by metric (several objectives).")
    over_budget: list[str] | None = Field(default=None, description="The budgets it broke: before training (never trained), or after (not chosen).")
    params: dict[str, Any]
    epochs: int = Field(description="Epochs trained (a pruned trial stopped after this many; an over_budget one: 0).")
    duplicate_of: int | None
    started_at: str | None
    duration_s: float | None
    mlflow_url: str | None


class StudyTrialList(BaseModel):
    items: list[StudyTrial]
    total: int = Field(description="Trials matching the filters, on every page.")
    next_page_token: str | None


class StudyList(BaseModel):
    items: list[StudyPublic]
    next_page_token: str | None
