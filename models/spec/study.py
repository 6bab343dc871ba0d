"""The study spec: a base trial spec, a search space over its fields, a sampler, a pruner, a budget.

It is the body of ``POST /studies``, is stored with the study in its Optuna storage (as JSON) and is
re-validated by every worker step. Search-space keys are dotted :class:`~models.spec.trial.TrialSpec`
paths (``"optim.lr"``, ``"model.kernel_size"``); validation checks each path exists, that every
value the space can produce passes the trial spec's own bounds and validators, and, when the
input's shape is known here, that every value is feasible with at least one combination of the
others. Errors name the field (``search_space.optim.lr.high``). This module must not import torch.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from models.spec.trial import TrialSpec
from models.spec.tuning import LrAutoSpec

__all__ = [
    "CategoricalParam",
    "FloatParam",
    "IntParam",
    "ObjectiveSpec",
    "PrunerSpec",
    "SamplerSpec",
    "SearchParam",
    "StudySpec",
    "apply_params",
    "grid_points",
    "param_values",
]

# Paths a study cannot search: what names, files and routes a trial, and the data (a study compares
# trials on one data set, or its objective values would not be comparable).
FORBIDDEN_PREFIXES = ("name", "tags", "queue", "data")
MAX_ENUMERATED = 64  # int ranges up to this many values are checked value by value
MAX_COMBINATIONS = 4096  # corner combinations checked for validity and feasibility
JsonValue = Any


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Condition = dict[Annotated[str, Field(min_length=1, max_length=100)], Annotated[list[JsonValue], Field(min_length=1, max_length=64)]]
WHEN_DESCRIPTION = (
    "Sample this parameter only when every named path (an earlier search-space key or a base field) has one of "
    "the listed values, e.g. {\"optim.optimizer\": [\"momentum\", \"nesterov\"]} for optim.momentum."
)


class FloatParam(_Spec):
    """A real-valued range; ``log`` samples uniformly in log space (learning rates)."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0, description="Discretise the range (not with log).")
    when: Condition | None = Field(default=None, description=WHEN_DESCRIPTION)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        if self.log and self.step is not None:
            raise ValueError("a float range is either log-scaled or stepped, not both")
        if self.step is not None and not _multiple(self.high - self.low, self.step):
            raise ValueError(f"high - low ({self.high - self.low:g}) must be a multiple of step ({self.step:g})")
        return self


class IntParam(_Spec):
    """An integer range, every ``step``-th value from ``low`` to ``high`` included."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False
    when: Condition | None = Field(default=None, description=WHEN_DESCRIPTION)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None)
        if self.log and self.step != 1:
            raise ValueError("a log-scaled int range takes no step")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low ({self.high - self.low}) must be a multiple of step ({self.step})")
        return self


class CategoricalParam(_Spec):
    """A choice among values (any JSON value the field accepts: names, numbers, lists, objects, null)."""

    type: Literal["categorical"] = "categorical"
    choices: list[JsonValue] = Field(min_length=1, max_length=64)
    when: Condition | None = Field(default=None, description=WHEN_DESCRIPTION)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Any]) -> list[Any]:
        encoded = [json.dumps(c, sort_keys=True) for c in choices]
        if len(set(encoded)) != len(encoded):
            raise ValueError("choices must be distinct")
        return choices

    @property
    def scalar(self) -> bool:
        """Whether Optuna can store the choices as they are (else they travel as JSON strings)."""
        return all(c is None or isinstance(c, (str, int, float, bool)) for c in self.choices)


def _list_is_categorical(value: Any) -> Any:
    # Shorthand: "model.activation": ["relu", "gelu"] is a categorical parameter.
    return {"type": "categorical", "choices": value} if isinstance(value, list) else value


SearchParam = Annotated[
    Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")], BeforeValidator(_list_is_categorical),
]


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not low < high:
        raise ValueError(f"low ({low:g}) must be below high ({high:g}); use a single choice for a fixed value")
    if log and low <= 0:
        raise ValueError(f"a log-scaled range needs low > 0, got {low:g}")


def _multiple(span: float, step: float) -> bool:
    ratio = span / step
    return abs(ratio - round(ratio)) < 1e-6 * max(1.0, ratio)


class ObjectiveSpec(_Spec):
    """What a study optimises: a per-epoch metric, its direction, and which epoch's value counts."""

    metric: Literal["val_accuracy", "val_loss", "train_loss"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] | None = Field(default=None, description="Default: maximize accuracy, minimize losses.")
    value: Literal["last_epoch", "best_epoch"] = Field(
        default="last_epoch", description="The trial's value: its last epoch's metric (the logged model's) or its best epoch's.",
    )

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("maximize" if self.metric == "val_accuracy" else "minimize")


class SamplerSpec(_Spec):
    """Optuna's sampler. ``grid`` enqueues every point of the space (which must then be enumerable)."""

    name: Literal["tpe", "random", "grid", "cmaes", "gp"] = "tpe"
    n_startup_trials: int = Field(default=8, ge=0, le=1000, description="Random trials before TPE, CMA-ES or GP model the results.")
    multivariate: bool = Field(default=False, description="TPE only: model the parameters jointly.")


class PrunerSpec(_Spec):
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


class StudySpec(_Spec):
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
            error = PydanticCustomError("invalid_study", problem[1])
            raise ValidationError.from_exception_data("StudySpec", [InitErrorDetails(type=error, loc=problem[0], input=None)])
        return self

    @model_validator(mode="after")
    def _check_space(self, info: ValidationInfo) -> StudySpec:
        from models.data.sets import describe

        if info.context and info.context.get("stored"):
            return self  # read back from the study's storage: checked when it was submitted (up to ~0.5 s for big spaces)

        from models.spec.space import space_problems

        problems = space_problems(self, describe(self.base.data, None))
        if problems:
            raise ValidationError.from_exception_data(
                "StudySpec",
                [InitErrorDetails(type=PydanticCustomError("invalid_study", message), loc=loc, input=None) for loc, message in problems],
            )
        return self

    def display_name(self) -> str:
        if self.name:
            return self.name
        keys = " ".join(_short_key(k) for k in self.search_space)
        return f"study {self.sampler.name}/{self.pruner.name}: {keys}"


# --- paths and values -------------------------------------------------------------------------------


def param_values(param: FloatParam | IntParam | CategoricalParam, *, corners_only: bool = False) -> list[Any]:
    """Values to check: every choice; every int when few (else the ends); a float range's ends."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        count = (param.high - param.low) // param.step + 1
        if count <= MAX_ENUMERATED and not corners_only:
            return list(range(param.low, param.high + 1, param.step))
        return [param.low, param.high]
    return [param.low, param.high]


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[leaf] = value


def _get_path(source: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(source, dict):
            return None
        source = source.get(part)
    return source


def apply_params(base: TrialSpec, params: dict[str, Any], *, name: str | None = None) -> TrialSpec:
    """The trial spec ``base`` becomes with ``params`` (path -> value) set; raises ValidationError."""
    data = base.model_dump(mode="json", exclude_unset=False)
    for path, value in params.items():
        _set_path(data, path, value)
    if name is not None:
        data["name"] = name
    return TrialSpec.model_validate(data)


def _condition_met(when: Condition | None, assigned: dict[str, Any], base: dict[str, Any]) -> bool:
    if not when:
        return True
    return all((assigned[p] if p in assigned else _get_path(base, p)) in allowed for p, allowed in when.items())


def _assignments(spec: StudySpec, values: dict[str, Sequence[Any]]) -> Iterator[dict[str, Any]]:
    """Every assignment of the given values, in space order, leaving out parameters whose condition fails."""
    base = spec.base.model_dump(mode="json")
    keys = list(spec.search_space)

    def walk(i: int, assigned: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if i == len(keys):
            yield dict(assigned)
            return
        key = keys[i]
        if not _condition_met(spec.search_space[key].when, assigned, base):
            yield from walk(i + 1, assigned)
            return
        for value in values[key]:
            assigned[key] = value
            yield from walk(i + 1, assigned)
            del assigned[key]

    return walk(0, {})


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every point of an enumerable space (choices, int ranges, stepped float ranges), in space order."""
    values: dict[str, Sequence[Any]] = {}
    for key, param in spec.search_space.items():
        if isinstance(param, FloatParam):
            if param.step is None:
                return []
            values[key] = _Steps(param.low, param.step, round((param.high - param.low) / param.step) + 1)
        elif isinstance(param, IntParam):
            values[key] = range(param.low, param.high + 1, param.step)  # lazy: a range may be huge
        else:
            values[key] = list(param.choices)
    return list(itertools.islice(_assignments(spec, values), 10_001))


class _Steps(Sequence):
    """The values of a stepped float range, computed on demand (a range may be huge)."""

    def __init__(self, low: float, step: float, count: int):
        self.low, self.step, self.count = low, step, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not 0 <= i < self.count:
            raise IndexError(i)
        return round(self.low + i * self.step, 12)


def _short_key(path: str) -> str:
    return path.rsplit(".", 1)[-1]
