"""What a study optimises, what it may spend, and how one trial is chosen from its results.

A study's *goals* are one objective or several (a Pareto front); its *constraints* are hard budgets.
Every goal, constraint and selection filter names a **measure** of a trial:

    per epoch   val_accuracy, val_loss, train_loss   logged every epoch (a single objective may prune on it)
    size        params, flops_per_sample             known from the plan before training (models.spec.plan)
    measured    latency_ms, latency_ms_batch         timed once at the end of training (TrialSpec.latency)

A size constraint is checked on every sampled configuration before it is sent: one that breaks it is
never trained. :func:`constraint_problems` refuses, at submit, a budget no corner of the search space
meets. :func:`pareto_front`, :func:`knee` and :func:`choose` pick trials from results (plain data in
and out), for the workers' report and the API alike. This module must not import torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from models.spec.base import Spec
from models.spec.plan import InfeasibleArchitecture, InputInfo, plan_network
from models.spec.space import MAX_COMBINATIONS, Problems, SearchedStudy, apply_params, corner_points

__all__ = [
    "EPOCH_MEASURES",
    "LATENCY_MEASURES",
    "SIZE_MEASURES",
    "Candidate",
    "ConstraintSpec",
    "Measure",
    "ObjectiveSpec",
    "RegisterSpec",
    "choose",
    "constraint_problems",
    "knee",
    "pareto_front",
]

Measure = Literal["val_accuracy", "val_loss", "train_loss", "params", "flops_per_sample", "latency_ms", "latency_ms_batch"]
Direction = Literal["maximize", "minimize"]
EPOCH_MEASURES = ("val_accuracy", "val_loss", "train_loss")
SIZE_MEASURES = ("params", "flops_per_sample")
LATENCY_MEASURES = ("latency_ms", "latency_ms_batch")
# The values a measure can take at all: a bound outside them can never be met.
_RANGES = {"val_accuracy": (0.0, 1.0), "params": (1.0, math.inf)}


def default_direction(metric: str) -> str:
    """Accuracy is maximised; losses, sizes and latencies are minimised."""
    return "maximize" if metric == "val_accuracy" else "minimize"


class ObjectiveSpec(Spec):
    """What a study optimises: a measure, its direction, and (per-epoch metrics) which epoch's value counts."""

    metric: Measure = Field(default="val_accuracy", description="A per-epoch metric, a size (params, flops_per_sample) or a measured latency.")
    direction: Direction | None = Field(default=None, description="Default: maximize accuracy, minimize everything else.")
    value: Literal["last_epoch", "best_epoch"] = Field(
        default="last_epoch", description="Per-epoch metrics: the trial's last epoch's value (the logged model's) or its best epoch's.",
    )

    @property
    def resolved_direction(self) -> str:
        return self.direction or default_direction(self.metric)


class ConstraintSpec(Spec):
    """A hard budget on one measure: an upper bound (``max``), a lower bound (``min``), or both."""

    metric: Measure
    max: float | None = Field(default=None, allow_inf_nan=False)
    min: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounded(self) -> ConstraintSpec:
        if self.max is None and self.min is None:
            raise ValueError(f"a constraint on {self.metric} needs a bound: max, min or both")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g})")
        return self

    @property
    def before_training(self) -> bool:
        """Whether it is checked on the sampled configuration, before anything trains."""
        return self.metric in SIZE_MEASURES

    def bounds(self) -> list[tuple[str, float]]:
        return [(op, b) for op, b in (("<=", self.max), (">=", self.min)) if b is not None]

    def violations(self, value: float | None) -> dict[str, float]:
        """Optuna's constraint values, one per bound (<= 0: met; unknown counts as met), relative to bounds above 1
        so that budgets of different scales add up."""
        out = {}
        for op, bound in self.bounds():
            excess = 0.0 if value is None else (value - bound if op == "<=" else bound - value)
            out[f"{self.metric}{op}{bound:g}"] = excess / max(abs(bound), 1.0)
        return out

    def broken_by(self, value: float) -> str | None:
        """Why ``value`` breaks this budget (``flops_per_sample 3,145,728 > max 2,000,000``), or None."""
        for op, bound in self.bounds():
            if (op == "<=" and value > bound) or (op == ">=" and value < bound):
                return f"{self.metric} {_number(value)} {'>' if op == '<=' else '<'} {'max' if op == '<=' else 'min'} {_number(bound)}"
        return None

    def __str__(self) -> str:
        return " and ".join(f"{self.metric} {op} {_number(b)}" for op, b in self.bounds())


class RegisterSpec(Spec):
    """Register a trial's model, chosen by a rule: the best by one measure (among trials that pass ``where``), or the knee of a
    two-objective front."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$", description="The MLflow registered model to add a version to.")
    rule: Literal["best", "knee"] = Field(
        default="best", description="best: the best trial by metric; knee: the front's point of best trade-off (two objectives only).",
    )
    metric: Measure | None = Field(default=None, description="best: the measure to rank by (default: the first objective).")
    direction: Direction | None = Field(default=None, description="best: default maximize accuracy, minimize the rest.")
    where: list[ConstraintSpec] = Field(default_factory=list, max_length=8, description="Only trials within these bounds are chosen from.")

    def describe(self, default_metric: str) -> str:
        """The rule for a person: ``best val_accuracy where flops_per_sample <= 2,000,000``, ``knee of the front``."""
        where = f" where {', '.join(str(c) for c in self.where)}" if self.where else ""
        return ("knee of the front" if self.rule == "knee" else f"best {self.metric or default_metric}") + where


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1000 else f"{value:.4g}"


# --- checks at submit ------------------------------------------------------------------------------


def constraint_problems(spec: SearchedStudy, constraints: Sequence[ConstraintSpec], info: InputInfo | None) -> Problems:
    """Budgets that can never be met: outside what the measure can be, or (sizes, ``info`` known) met by no corner of the space.

    The corners (each range's ends, every choice) bound the sizes: parameters and FLOPs grow with
    channels, kernel and depth. Silent when the space has too many corners to check them all.
    """
    problems: Problems = []
    for i, c in enumerate(constraints):
        low, high = _RANGES.get(c.metric, (0.0, math.inf))
        if (c.max is not None and c.max < low) or (c.min is not None and c.min > high):
            problems.append((("constraints", i), f"{c} can never be met: {c.metric} lies in [{low:g}, {high:g}]"))
    sized = [(i, c) for i, c in enumerate(constraints) if c.before_training]
    if problems or not sized or info is None:
        return problems
    corners = list(itertools.islice(corner_points(spec), MAX_COMBINATIONS + 1))
    if len(corners) > MAX_COMBINATIONS:
        return problems
    sizes = []
    for combo in corners:
        try:
            plan = plan_network(apply_params(spec.base, combo).model, info)
        except (ValidationError, InfeasibleArchitecture):
            continue  # the space's own checks name a corner that is no valid, feasible trial
        sizes.append({"params": plan.params, "flops_per_sample": plan.flops})
    for i, c in sized:
        values = [s[c.metric] for s in sizes]
        if values and all(c.broken_by(v) for v in values):
            problems.append((
                ("constraints", i),
                f"no corner of the search space meets {c}: over its corners {c.metric} ranges from {_number(min(values))} to {_number(max(values))}",
            ))
    return problems


# --- choosing from results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A trial that completed: its objective values (in goal order), every measure known of it, and whether it met the budgets."""

    number: int
    values: tuple[float, ...]
    measures: Mapping[str, float]
    feasible: bool = True


def _dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    worse_nowhere = all(s * x <= s * y for s, x, y in zip(signs, a, b, strict=True))
    return worse_nowhere and any(s * x < s * y for s, x, y in zip(signs, a, b, strict=True))


def pareto_front(candidates: Sequence[Candidate], directions: Sequence[str]) -> list[Candidate]:
    """The feasible candidates no other feasible one dominates, ordered by the first objective (best first)."""
    feasible = [c for c in candidates if c.feasible]
    front = [c for c in feasible if not any(_dominates(o.values, c.values, directions) for o in feasible if o is not c)]
    first = 1.0 if directions[0] == "minimize" else -1.0
    return sorted(front, key=lambda c: (first * c.values[0], c.number))


def knee(front: Sequence[Candidate], directions: Sequence[str]) -> Candidate | None:
    """The point of a two-objective front farthest from the line through its two ends (objectives scaled to [0, 1]).

    With fewer than three points there is no bend: the one with the smallest sum of scaled objectives.
    """
    if not front:
        return None
    assert len(directions) == 2, "a knee is defined on a two-objective front"
    scaled = {c.number: _scaled(c, front, directions) for c in front}
    if len(front) < 3:
        return min(front, key=lambda c: (sum(scaled[c.number]), c.number))
    (x1, y1), (x2, y2) = scaled[front[0].number], scaled[front[-1].number]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0

    def distance(c: Candidate) -> float:
        x, y = scaled[c.number]
        return abs((x2 - x1) * (y1 - y) - (x1 - x) * (y2 - y1)) / length

    return max(front, key=lambda c: (distance(c), -c.number))


def _scaled(c: Candidate, front: Sequence[Candidate], directions: Sequence[str]) -> tuple[float, float]:
    """The candidate's objectives scaled to [0, 1] over the front, 0 the best."""
    out = []
    for i, direction in enumerate(directions):
        values = [f.values[i] for f in front]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        out.append((c.values[i] - low) / span if direction == "minimize" else (high - c.values[i]) / span)
    return out[0], out[1]


def choose(
    candidates: Sequence[Candidate], goals: Sequence[ObjectiveSpec], *, rule: str = "best", metric: str | None = None,
    direction: str | None = None, where: Sequence[ConstraintSpec] = (),
) -> Candidate | None:
    """The trial a rule chooses among the feasible candidates within ``where``; None when none qualifies.

    ``best``: the best by ``metric`` (default: the first objective's value); ``knee``: :func:`knee` of their front.
    """
    pool = [c for c in candidates if c.feasible and all(w.metric in c.measures and w.broken_by(c.measures[w.metric]) is None for w in where)]
    directions = [g.resolved_direction for g in goals]
    if rule == "knee":
        return knee(pareto_front(pool, directions), directions)
    if metric is None or (metric == goals[0].metric and direction in (None, directions[0])):
        ranked = [(c.values[0], c) for c in pool]
        direction = directions[0]
    else:
        ranked = [(c.measures[metric], c) for c in pool if metric in c.measures]
        direction = direction or default_direction(metric)
    if not ranked:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(ranked, key=lambda vc: (sign * vc[0], vc[1].number))[1]
