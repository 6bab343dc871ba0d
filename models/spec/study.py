"""The study spec: a base trial spec, a search space over its fields, a sampler, a pruner, a budget.

It is the body of ``POST /studies``, is stored with the study in its Optuna storage (as JSON) and is
re-validated by every worker step. The search space and its checks are :mod:`models.spec.space`'s:
validation checks each path exists and may be searched, that every value the space can produce
passes the trial spec's own bounds and validators, and, when the input's shape is known here (the
built-in data sets), that every value is feasible with at least one combination of the others.
Errors name the field (``search_space.optim.lr.high``). This module must not import torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, HttpUrl, ValidationError, ValidationInfo, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from models.spec.base import Spec
from models.spec.plan import builtin_input
from models.spec.space import (
    GRID_LIMIT,
    FloatParam,
    JsonValue,
    Problems,
    SearchParam,
    combination_problems,
    grid_points,
    param_values,
    path_problems,
    value_problems,
)
from models.spec.trial import TrialSpec
from models.spec.tuning import LrAutoSpec

__all__ = ["ObjectiveSpec", "PrunerSpec", "SamplerSpec", "StudySpec"]


class ObjectiveSpec(Spec):
    """What a study optimises: a per-epoch metric, its direction, and which epoch's value counts."""

    metric: Literal["val_accuracy", "val_loss", "train_loss"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] | None = Field(default=None, description="Default: maximize accuracy, minimize losses.")
    value: Literal["last_epoch", "best_epoch"] = Field(
        default="last_epoch", description="The trial's value: its last epoch's metric (the logged model's) or its best epoch's.",
    )

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("maximize" if self.metric == "val_accuracy" else "minimize")


class SamplerSpec(Spec):
    """Optuna's sampler. ``grid`` enqueues every point of the space (which must then be enumerable)."""

    name: Literal["tpe", "random", "grid", "cmaes", "gp"] = "tpe"
    n_startup_trials: int = Field(default=8, ge=0, le=1000, description="Random trials before TPE, CMA-ES or GP model the results.")
    multivariate: bool = Field(default=False, description="TPE only: model the parameters jointly.")


class PrunerSpec(Spec):
    """Optuna's pruner, judging each trial on its objective after every epoch."""

    name: Literal["none", "median", "successive_halving", "hyperband"] = "successive_halving"
    min_resource: int = Field(default=1, ge=1, le=1000, description="successive_halving, hyperband: epochs before the first rung.")
    max_resource: int | None = Field(default=None, ge=1, le=1000, description="hyperband: epochs of a full trial (default: the base's epochs).")
    reduction_factor: int = Field(default=3, ge=2, le=10, description="successive_halving, hyperband: keep the top 1/reduction_factor at each rung.")
    min_early_stopping_rate: int = Field(default=0, ge=0, le=10, description="successive_halving only.")
    n_startup_trials: int = Field(default=5, ge=0, le=1000, description="median: trials completed before it prunes.")
    n_warmup_steps: int = Field(default=1, ge=0, le=1000, description="median: epochs of each trial before it may be pruned.")


def _name_is_sampler(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class StudySpec(Spec):
    """A search over trial specs: what varies, how it is sampled and pruned, and the budget."""

    name: str | None = Field(default=None, max_length=200, description="A human name for the study's parent run.")
    base: TrialSpec = Field(default_factory=TrialSpec, description="The trial every sampled configuration starts from.")
    search_space: dict[Annotated[str, Field(min_length=1, max_length=100)], SearchParam] = Field(
        max_length=32,
        description="Dotted trial-spec path -> a range or a choice list, sampled in this order (conditions may refer to earlier keys).",
    )
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    sampler: Annotated[SamplerSpec, BeforeValidator(_name_is_sampler)] = Field(default_factory=SamplerSpec)
    pruner: Annotated[PrunerSpec, BeforeValidator(_name_is_sampler)] = Field(default_factory=PrunerSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the sampler (each trial's draw is seeded from it).")
    n_trials: int | None = Field(default=None, ge=1, le=10_000, description="Trials to run; default 20, or the whole grid.")
    parallelism: int = Field(default=2, ge=1, le=256, description="Most trials running at once.")
    timeout_s: float | None = Field(default=None, gt=0, le=30 * 24 * 3600, description="Start no trial after this long (running ones finish).")
    target: float | None = Field(default=None, description="Stop once a trial's value reaches this (in the objective's direction).")
    warm_start: list[dict[str, JsonValue]] = Field(
        default_factory=list, max_length=1000, description="Known configurations (search-space key -> value) to try first.",
    )
    register_as: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Register the best trial's model as a new version of this MLflow registered model.",
    )
    register_alias: str = Field(default="candidate", min_length=1, max_length=100, pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    tags: dict[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=20, description="Free-form tags copied to the study's parent run.",
    )
    callback_url: HttpUrl | None = Field(
        default=None, description="Receives a signed POST (X-Convtune-Signature) when the study ends; retried with backoff (docs/api.md).",
    )
    lr_auto: LrAutoSpec | None = Field(
        default=None,
        description=(
            "Run one learning-rate range test of the base trial before the first trial, then search optim.lr log-uniformly "
            "around its suggestion (docs/tuning.md); optim.lr is then not in search_space."
        ),
    )

    @property
    def budget(self) -> int:
        """The number of trials to run."""
        if self.n_trials is not None:
            return self.n_trials
        return len(grid_points(self)) if self.sampler.name == "grid" else 20

    @model_validator(mode="after")
    def _lr_auto_fits(self) -> StudySpec:
        # Tuning (issue 4): lr_auto adds optim.lr to the space once its range test ran (workers.trial.lr_finder.with_lr_range).
        problem = None
        if self.lr_auto is None and not self.search_space:
            problem = ("search_space",), "search_space is empty: give at least one parameter to search, or lr_auto"
        elif self.lr_auto is not None and "optim.lr" in self.search_space:
            problem = ("search_space", "optim.lr"), "lr_auto searches optim.lr itself: remove optim.lr from search_space"
        elif self.lr_auto is not None and self.sampler.name == "grid":
            problem = ("lr_auto",), "a grid cannot search the continuous learning-rate range of lr_auto: use another sampler"
        if problem:
            raise _invalid([problem])
        return self

    @model_validator(mode="after")
    def _check_space(self, info: ValidationInfo) -> StudySpec:
        if info.context and info.context.get("stored"):
            return self  # read back from the study's storage: checked when it was submitted (up to ~0.5 s for big spaces)
        # The checks of models.spec.space, with the budget's between the values' and the (slowest) combinations'.
        problems = path_problems(self)
        if not problems:
            problems = value_problems(self) + _budget_problems(self)
        if not problems:
            problems = combination_problems(self, builtin_input(self.base.data))
        if problems:
            raise _invalid(problems)
        return self

    def display_name(self) -> str:
        if self.name:
            return self.name
        keys = " ".join(_short_key(k) for k in self.search_space)
        return f"study {self.sampler.name}/{self.pruner.name}: {keys}"


def _invalid(problems: Problems) -> ValidationError:
    """One validation error per problem, each at its location (a 422 naming the fields)."""
    return ValidationError.from_exception_data(
        "StudySpec",
        [InitErrorDetails(type=PydanticCustomError("invalid_study", message), loc=loc, input=None) for loc, message in problems],
    )


def _budget_problems(spec: StudySpec) -> Problems:
    """A grid that cannot be enumerated or is smaller than n_trials; pruner resources beyond the trials' epochs."""
    problems: Problems = []
    if spec.sampler.name == "grid":
        not_enumerable = [k for k, p in spec.search_space.items() if isinstance(p, FloatParam) and p.step is None]
        if not_enumerable:
            return [(("search_space", not_enumerable[0]), "a grid needs choices or a stepped range, not a continuous float range")]
        size = len(grid_points(spec))
        if size > GRID_LIMIT:
            problems.append((("search_space",), f"the grid has more than {GRID_LIMIT:,} points; narrow it or use another sampler"))
        elif spec.n_trials is not None and spec.n_trials > size:
            problems.append((("n_trials",), f"the grid has {size} points; n_trials cannot exceed it"))
    epochs = _max_epochs(spec)
    if spec.pruner.name == "hyperband" and spec.pruner.max_resource is not None and spec.pruner.max_resource > epochs:
        problems.append((("pruner", "max_resource"), f"max_resource ({spec.pruner.max_resource}) is more than the {epochs} epochs a trial trains"))
    # Only a min_resource the client chose: the default pruner on one-epoch trials just never prunes.
    if spec.pruner.name in ("hyperband", "successive_halving") and "min_resource" in spec.pruner.model_fields_set and spec.pruner.min_resource >= epochs:
        problems.append((("pruner", "min_resource"), f"min_resource ({spec.pruner.min_resource}) leaves nothing to prune in {epochs}-epoch trials"))
    return problems


def _max_epochs(spec: StudySpec) -> int:
    param = spec.search_space.get("optim.epochs")
    return max(param_values(param)) if param is not None else spec.base.optim.epochs


def _short_key(path: str) -> str:
    return path.rsplit(".", 1)[-1]
