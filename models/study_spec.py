"""The study spec: a base trial spec, a search space over its fields, a sampler, a pruner, a budget.

It is the body of ``POST /studies``, is stored with the study in its Optuna storage (as JSON) and is
re-validated by every worker step. Search-space keys are dotted :class:`~models.spec.TrialSpec`
paths (``"optim.lr"``, ``"model.kernel_size"``); validation checks each path exists, that every
value the space can produce passes the trial spec's own bounds and validators, and, when the
input's shape is known here, that every value is feasible with at least one combination of the
others. Errors name the field (``search_space.optim.lr.high``). This module must not import torch.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from models.spec import TrialSpec

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
    "space_problems",
]

# Paths a study cannot search: what names, files and routes a trial, and the data (a study compares
# trials on one data set, or its objective values would not be comparable).
FORBIDDEN_PREFIXES = ("name", "tags", "queue", "data")
MAX_ENUMERATED = 64  # int ranges up to this many values are checked value by value
MAX_COMBINATIONS = 4096  # corner combinations checked for validity and feasibility
Scalar = Union[str, int, float, bool, None]
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
    Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")], BeforeValidator(_list_is_categorical),
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
        min_length=1, max_length=32,
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

    @property
    def budget(self) -> int:
        """The number of trials to run."""
        if self.n_trials is not None:
            return self.n_trials
        return len(grid_points(self)) if self.sampler.name == "grid" else 20

    @model_validator(mode="after")
    def _check_space(self, info: ValidationInfo) -> StudySpec:
        from models.data import describe

        if info.context and info.context.get("stored"):
            return self  # read back from the study's storage: checked when it was submitted (up to ~0.5 s for big spaces)

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


def _field_annotation(path: str) -> tuple[Any, str | None]:
    """The annotation of ``path`` in TrialSpec; (None, reason) when it is not a searchable field."""
    model: Any = TrialSpec
    annotation: Any = None
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i]) or "the trial spec"
            known = ", ".join(sorted(fields)) if fields else "none (not an object)"
            return None, f"{where} has no field {part!r}; its fields: {known}"
        annotation = fields[part].annotation
        model = _model_in(annotation)
    return annotation, None


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (through Optional), else None."""
    candidates = [annotation, *get_args(annotation)] if get_origin(annotation) is Union or get_args(annotation) else [annotation]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _numeric_kind(annotation: Any) -> str | None:
    kinds = {a for a in (annotation, *get_args(annotation)) if a in (int, float)}
    return "float" if float in kinds else "int" if int in kinds else None


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


# --- validation -------------------------------------------------------------------------------------

Loc = tuple[Union[str, int], ...]


def space_problems(spec: StudySpec, info: Any | None) -> list[tuple[Loc, str]]:
    """Everything wrong with the search space, as (location, message); feasibility only when ``info`` is known."""
    problems: list[tuple[Loc, str]] = []
    for key, param in spec.search_space.items():
        problems += _path_problems(spec, key, param)
    if problems:
        return problems
    for key, param in spec.search_space.items():
        problems += _value_problems(spec, key, param)
    problems += _warm_start_problems(spec)
    problems += _budget_problems(spec)
    if problems:
        return problems
    return _combination_problems(spec, info)


def _path_problems(spec: StudySpec, key: str, param: Any) -> list[tuple[Loc, str]]:
    loc: Loc = ("search_space", key)
    if any(key == p or key.startswith(p + ".") for p in FORBIDDEN_PREFIXES):
        return [(loc, f"{key!r} cannot be searched: a study varies the model and its optimisation, not {', '.join(FORBIDDEN_PREFIXES)}")]
    annotation, reason = _field_annotation(key)
    if reason:
        return [(loc, f"no such trial spec field: {reason}")]
    others = [k for k in spec.search_space if k != key and k.startswith(key + ".")]
    if others:
        return [(loc, f"{key!r} and {others[0]!r} overlap: search a field or its parts, not both")]
    if isinstance(param, (FloatParam, IntParam)):
        kind = _numeric_kind(annotation)
        if kind is None:
            return [(loc, f"{key!r} is not a number: give it a choice list instead of a range")]
        if kind == "int" and isinstance(param, FloatParam):
            return [(loc + ("type",), f"{key!r} is an integer field: use type 'int'")]
    problems = []
    keys = list(spec.search_space)
    for path in (param.when or {}):
        if path in spec.search_space and keys.index(path) > keys.index(key):
            problems.append((loc + ("when", path), f"the condition refers to {path!r}, which comes later in the search space; list it first"))
        elif path not in spec.search_space and _field_annotation(path)[1]:
            problems.append((loc + ("when", path), f"no such trial spec field: {_field_annotation(path)[1]}"))
    return problems


def _value_problems(spec: StudySpec, key: str, param: Any) -> list[tuple[Loc, str]]:
    """Each value the parameter can take, set alone on the base (with its condition met), must be a valid trial."""
    where = {"categorical": "choices"}.get(param.type)
    problems = []
    condition = {path: allowed[0] for path, allowed in (param.when or {}).items()}
    for index, value in enumerate(param_values(param)):
        error = _trial_error(spec.base, {**condition, key: value})
        if error:
            if where:
                loc: Loc = ("search_space", key, where, index)
            elif isinstance(param, IntParam) and value not in (param.low, param.high):
                loc = ("search_space", key, "step")
            else:
                loc = ("search_space", key, "low" if value == param.low else "high")
            problems.append((loc, f"{key}={json.dumps(value)} is not a valid trial: {error}"))
    return problems


def _trial_error(base: TrialSpec, params: dict[str, Any]) -> str | None:
    try:
        apply_params(base, params)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = first["msg"].removeprefix("Value error, ")
        return f"{field}: {message}" if field else message
    return None


def _warm_start_problems(spec: StudySpec) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for index, point in enumerate(spec.warm_start):
        for key, value in point.items():
            loc: Loc = ("warm_start", index, key)
            param = spec.search_space.get(key)
            if param is None:
                problems.append((loc, f"{key!r} is not a key of the search space"))
            elif not _in_param(param, value):
                problems.append((loc, f"{json.dumps(value)} is outside the search space of {key!r}"))
        if not problems and point:
            error = _trial_error(spec.base, point)
            if error:
                problems.append((("warm_start", index), f"not a valid trial: {error}"))
    return problems


def _in_param(param: Any, value: Any) -> bool:
    if isinstance(param, CategoricalParam):
        return any(json.dumps(value, sort_keys=True) == json.dumps(c, sort_keys=True) for c in param.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(param, IntParam):
        return float(value).is_integer() and param.low <= value <= param.high and (int(value) - param.low) % param.step == 0
    if not param.low <= value <= param.high:
        return False
    return param.step is None or _multiple(value - param.low, param.step)


def _budget_problems(spec: StudySpec) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    if spec.sampler.name == "grid":
        not_enumerable = [k for k, p in spec.search_space.items() if isinstance(p, FloatParam) and p.step is None]
        if not_enumerable:
            return [(("search_space", not_enumerable[0]), "a grid needs choices or a stepped range, not a continuous float range")]
        size = len(grid_points(spec))
        if size > 10_000:
            problems.append((("search_space",), "the grid has more than 10,000 points; narrow it or use another sampler"))
        elif spec.n_trials is not None and spec.n_trials > size:
            problems.append((("n_trials",), f"the grid has {size} points; n_trials cannot exceed it"))
    epochs = _max_epochs(spec)
    if spec.pruner.name == "hyperband" and spec.pruner.max_resource is not None and spec.pruner.max_resource > epochs:
        problems.append((("pruner", "max_resource"), f"max_resource ({spec.pruner.max_resource}) is more than the {epochs} epochs a trial trains"))
    if spec.pruner.name in ("hyperband", "successive_halving") and spec.pruner.min_resource >= epochs:
        problems.append((("pruner", "min_resource"), f"min_resource ({spec.pruner.min_resource}) leaves nothing to prune in {epochs}-epoch trials"))
    return problems


def _max_epochs(spec: StudySpec) -> int:
    param = spec.search_space.get("optim.epochs")
    return max(param_values(param)) if param is not None else spec.base.optim.epochs


def _combination_problems(spec: StudySpec, info: Any | None) -> list[tuple[Loc, str]]:
    """Check the corners' combinations: each value must give a valid (and feasible) trial with some of them."""
    from models.shapes import InfeasibleSpec, plan_network

    corners = {k: param_values(p, corners_only=True) for k, p in spec.search_space.items()}
    total = math.prod(len(v) for v in corners.values())
    combos = list(itertools.islice(_assignments(spec, corners), MAX_COMBINATIONS + 1))
    complete = len(combos) <= MAX_COMBINATIONS
    if not complete:
        combos = random.Random(0).sample(combos, MAX_COMBINATIONS)
    good: set[tuple[str, str]] = set()
    reasons: dict[tuple[str, str], str] = {}
    for combo in combos:
        keys = {(k, json.dumps(v, sort_keys=True)) for k, v in combo.items()}
        reason = _trial_error(spec.base, combo)
        if reason is None and info is not None:
            try:
                plan_network(apply_params(spec.base, combo).model, info)
            except InfeasibleSpec as exc:
                reason = f"infeasible: {exc}"
        if reason is None:
            good |= keys
        else:
            for k in keys:
                reasons.setdefault(k, reason)
    if not good:
        example = next(iter(reasons.values()), "no combination")
        scope = "of its corner values" if complete else f"of {MAX_COMBINATIONS} sampled corner combinations (of about {total})"
        return [(("search_space",), f"no combination {scope} gives a valid, feasible trial; e.g. {example}")]
    if not complete:
        return []
    return [
        (("search_space", key), f"{key}={value} never gives a valid, feasible trial with the rest of the space: {reason}")
        for (key, value), reason in reasons.items() if (key, value) not in good
    ]
