"""Checks of a study spec's search space: paths, every value's validity, and feasibility of combinations.

:func:`space_problems` lists everything wrong as (location, message), the location naming the field
(``("search_space", "optim.lr", "high")``). The study spec's validator calls it with the input's shape
when it is known without a data root (the built-in data sets); the API calls it again for file data it
can see. This module must not import torch.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from models.spec.trial import TrialSpec
from models.spec.study import (
    FORBIDDEN_PREFIXES,
    MAX_COMBINATIONS,
    CategoricalParam,
    FloatParam,
    IntParam,
    StudySpec,
    _assignments,
    _multiple,
    apply_params,
    grid_points,
    param_values,
)

__all__ = ["space_problems"]

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

Loc = tuple[str | int, ...]


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
    # Only a min_resource the client chose: the default pruner on one-epoch trials just never prunes.
    if spec.pruner.name in ("hyperband", "successive_halving") and "min_resource" in spec.pruner.model_fields_set and spec.pruner.min_resource >= epochs:
        problems.append((("pruner", "min_resource"), f"min_resource ({spec.pruner.min_resource}) leaves nothing to prune in {epochs}-epoch trials"))
    return problems


def _max_epochs(spec: StudySpec) -> int:
    param = spec.search_space.get("optim.epochs")
    return max(param_values(param)) if param is not None else spec.base.optim.epochs


def _combination_problems(spec: StudySpec, info: Any | None) -> list[tuple[Loc, str]]:
    """Check the corners' combinations: each value must give a valid (and feasible) trial with some of them."""
    from models.spec.plan import InfeasibleSpec, plan_network

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
