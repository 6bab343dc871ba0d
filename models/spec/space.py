"""A study's search space: its parameters, the trial specs they make, and the checks that every value is valid.

A search space maps dotted :class:`~models.spec.trial.TrialSpec` paths (``"optim.lr"``,
``"model.kernel_size"``) to a range or a choice list, sampled in order; a parameter may be sampled
only ``when`` earlier ones (or base fields) have given values. :func:`apply_params` makes the
trial spec a point of the space stands for.

:func:`space_problems` lists everything wrong with a space as (location, message), the location
naming the field (``("search_space", "optim.lr", "high")``): paths that do not exist or cannot be
searched, values that no trial accepts, warm-start points outside the space and, when the input's
shape is known, values that are infeasible with every combination of the others. The study spec's
validator runs these checks with the input of a built-in data set; the API runs them again for file
data it can read. This module must not import torch.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from models.spec.base import Spec
from models.spec.plan import InfeasibleArchitecture, InputInfo, plan_network
from models.spec.trial import NON_HYPERPARAMETERS, TrialSpec

__all__ = [
    "GRID_LIMIT",
    "MAX_COMBINATIONS",
    "UNSEARCHABLE",
    "CategoricalParam",
    "FloatParam",
    "IntParam",
    "JsonValue",
    "Problems",
    "SearchParam",
    "SearchedStudy",
    "apply_params",
    "combination_problems",
    "condition_met",
    "corner_points",
    "grid_points",
    "param_values",
    "path_problems",
    "space_problems",
    "value_problems",
]

# Paths a study cannot search: what is not a hyperparameter, and the data (a study compares its
# trials on one data set, or their objective values would not be comparable).
UNSEARCHABLE = (*NON_HYPERPARAMETERS, "data")
MAX_ENUMERATED = 64  # int ranges up to this many values are checked value by value
MAX_COMBINATIONS = 4096  # corner combinations checked for validity and feasibility
GRID_LIMIT = 10_000  # points a grid may have
JsonValue = Any  # what a choice or a warm-start value may be: any JSON value the field accepts
Loc = tuple[str | int, ...]
Problems = list[tuple[Loc, str]]  # (location of the field, what is wrong with it)

Condition = dict[Annotated[str, Field(min_length=1, max_length=100)], Annotated[list[JsonValue], Field(min_length=1, max_length=64)]]
WHEN_DESCRIPTION = (
    "Sample this parameter only when every named path (an earlier search-space key or a base field) has one of "
    "the listed values, e.g. {\"optim.optimizer\": [\"momentum\", \"nesterov\"]} for optim.momentum."
)


# --- parameters --------------------------------------------------------------------------------------


class FloatParam(Spec):
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
        if self.step is not None and (self.high - self.low) / self.step > MAX_STEPS:
            raise ValueError(f"step ({self.step:g}) is too small: the range would hold more than {MAX_STEPS:,} values")
        if self.step is not None and not _multiple(self.high - self.low, self.step):
            raise ValueError(f"high - low ({self.high - self.low:g}) must be a multiple of step ({self.step:g})")
        return self


class IntParam(Spec):
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


class CategoricalParam(Spec):
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


# A stepped float range holds at most this many values (a step of 5e-324 would overflow the arithmetic).
MAX_STEPS = 10**9


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not low < high:
        raise ValueError(f"low ({low:g}) must be below high ({high:g}); use a single choice for a fixed value")
    if log and low <= 0:
        raise ValueError(f"a log-scaled range needs low > 0, got {low:g}")


def _multiple(span: float, step: float) -> bool:
    ratio = span / step
    return abs(ratio - round(ratio)) < 1e-6 * max(1.0, ratio)


class SearchedStudy(Protocol):
    """What this module reads of a study spec (:class:`models.spec.study.StudySpec`)."""

    @property
    def base(self) -> TrialSpec: ...

    @property
    def search_space(self) -> Mapping[str, FloatParam | IntParam | CategoricalParam]: ...

    @property
    def warm_start(self) -> Sequence[Mapping[str, Any]]: ...


# --- points of the space -----------------------------------------------------------------------------


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


def condition_met(when: Condition | None, assigned: Mapping[str, Any], base: dict[str, Any]) -> bool:
    """Whether a parameter with condition ``when`` is sampled: every path it names has one of its allowed values.

    A path's value is the one already ``assigned`` to it (an earlier search-space key), else the
    base's (``base``: the base trial spec dumped as JSON); no condition is always met.
    """
    if not when:
        return True
    return all((assigned[p] if p in assigned else _get_path(base, p)) in allowed for p, allowed in when.items())


def _assignments(spec: SearchedStudy, values: dict[str, Sequence[Any]]) -> Iterator[dict[str, Any]]:
    """Every assignment of the given values, in space order, leaving out parameters whose condition fails."""
    base = spec.base.model_dump(mode="json")
    keys = list(spec.search_space)

    def walk(i: int, assigned: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if i == len(keys):
            yield dict(assigned)
            return
        key = keys[i]
        if not condition_met(spec.search_space[key].when, assigned, base):
            yield from walk(i + 1, assigned)
            return
        for value in values[key]:
            assigned[key] = value
            yield from walk(i + 1, assigned)
            del assigned[key]

    return walk(0, {})


def corner_points(spec: SearchedStudy) -> Iterator[dict[str, Any]]:
    """Every combination of the parameters' corner values (a range's ends, every choice), conditions applied (lazy)."""
    return _assignments(spec, {k: param_values(p, corners_only=True) for k, p in spec.search_space.items()})


def grid_points(spec: SearchedStudy) -> list[dict[str, Any]]:
    """Every point of an enumerable space (choices, int ranges, stepped float ranges), in space order.

    Empty when a float range is continuous; at most ``GRID_LIMIT + 1`` points (enough to tell a too-big grid).
    """
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
    return list(itertools.islice(_assignments(spec, values), GRID_LIMIT + 1))


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


# --- checks ------------------------------------------------------------------------------------------


def space_problems(spec: SearchedStudy, info: InputInfo | None) -> Problems:
    """Everything wrong with the search space, as (location, message); feasibility only when ``info`` is known.

    Each stage runs only when the one before found nothing: paths, then values, then combinations.
    """
    return path_problems(spec) or value_problems(spec) or combination_problems(spec, info)


def path_problems(spec: SearchedStudy) -> Problems:
    """Keys that are no trial spec field, cannot be searched, overlap, or misuse a range or a condition."""
    problems: Problems = []
    for key, param in spec.search_space.items():
        problems += _path_problems(spec, key, param)
    return problems


def _path_problems(spec: SearchedStudy, key: str, param: FloatParam | IntParam | CategoricalParam) -> Problems:
    loc: Loc = ("search_space", key)
    field = key.split(".")[0]
    if field in NON_HYPERPARAMETERS:
        return [(loc, f"{key!r} cannot be searched: it is not a hyperparameter ({', '.join(NON_HYPERPARAMETERS)} are not); set it on the base")]
    if field in UNSEARCHABLE:
        return [(loc, f"{key!r} cannot be searched: a study compares its trials on one data set; set {field!r} on the base")]
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


def _field_annotation(path: str) -> tuple[Any, str | None]:
    """The annotation of ``path`` in TrialSpec; (None, reason) when it is not a field."""
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


def value_problems(spec: SearchedStudy) -> Problems:
    """Values no trial accepts, alone on the base, and warm-start points outside the space; needs valid paths."""
    problems: Problems = []
    for key, param in spec.search_space.items():
        problems += _param_value_problems(spec, key, param)
    return problems + _warm_start_problems(spec)


def _param_value_problems(spec: SearchedStudy, key: str, param: FloatParam | IntParam | CategoricalParam) -> Problems:
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


def _warm_start_problems(spec: SearchedStudy) -> Problems:
    problems: Problems = []
    for index, point in enumerate(spec.warm_start):
        for key, value in point.items():
            loc: Loc = ("warm_start", index, key)
            param = spec.search_space.get(key)
            if param is None:
                problems.append((loc, f"{key!r} is not a key of the search space"))
            elif not _in_param(param, value):
                problems.append((loc, f"{json.dumps(value)} is outside the search space of {key!r}"))
        if not problems and point:
            error = _trial_error(spec.base, dict(point))
            if error:
                problems.append((("warm_start", index), f"not a valid trial: {error}"))
    return problems


def _in_param(param: FloatParam | IntParam | CategoricalParam, value: Any) -> bool:
    if isinstance(param, CategoricalParam):
        return any(json.dumps(value, sort_keys=True) == json.dumps(c, sort_keys=True) for c in param.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(param, IntParam):
        return float(value).is_integer() and param.low <= value <= param.high and (int(value) - param.low) % param.step == 0
    if not param.low <= value <= param.high:
        return False
    return param.step is None or _multiple(value - param.low, param.step)


def combination_problems(spec: SearchedStudy, info: InputInfo | None) -> Problems:
    """Check the corners' combinations: each value must give a valid (and, with ``info``, feasible) trial with some of them."""
    if not spec.search_space:
        return []  # lr_auto alone: nothing is combined, and the base was validated as a TrialSpec
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
            except InfeasibleArchitecture as exc:
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
