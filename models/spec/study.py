"""The study spec: a base trial spec, a search space over its fields, objectives and budgets, a sampler, a pruner.

It is the body of ``POST /studies``, is stored with the study in its Optuna storage (as JSON) and is
re-validated by every worker step. The search space and its checks are :mod:`models.spec.space`'s:
validation checks each path exists and may be searched, that every value the space can produce
passes the trial spec's own bounds and validators, and, when the input's shape is known here (the
built-in data sets), that every value is feasible with at least one combination of the others.
Objectives, constraints and the rule that chooses a trial are :mod:`models.spec.objectives`'s; a
size budget no corner of the space meets, pruning or a target with several objectives are refused
here too. Errors name the field (``search_space.optim.lr.high``). This module must not import torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, HttpUrl, ValidationError, ValidationInfo, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from models.spec.base import Spec
from models.spec.choices import PRUNERS, SAMPLERS
from models.spec.objectives import EPOCH_MEASURES, LATENCY_MEASURES, ConstraintSpec, ObjectiveSpec, RegisterSpec, constraint_problems
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
from models.spec.trial import Priority, TrialSpec
from models.spec.tuning import LrAutoSpec

__all__ = ["ConstraintSpec", "ObjectiveSpec", "PrunerSpec", "RegisterSpec", "SamplerSpec", "StudySpec"]


class SamplerSpec(Spec):
    """Optuna's sampler. ``grid`` enqueues every point of the space (which must then be enumerable)."""

    name: Literal[tuple(SAMPLERS)] = "tpe"  # type: ignore[valid-type]
    n_startup_trials: int = Field(default=8, ge=0, le=1000, description="Random trials before TPE, CMA-ES or GP model the results.")
    multivariate: bool = Field(default=False, description="TPE only: model the parameters jointly.")
    population_size: int = Field(default=50, ge=2, le=1000, description="nsga2 only: trials per generation.")


class PrunerSpec(Spec):
    """Optuna's pruner, judging each trial on its objective after every epoch."""

    name: Literal[tuple(PRUNERS)] = "successive_halving"  # type: ignore[valid-type]
    min_resource: int = Field(default=1, ge=1, le=1000, description="successive_halving, hyperband: epochs before the first rung.")
    max_resource: int | None = Field(default=None, ge=1, le=1000, description="hyperband: epochs of a full trial (default: the base's epochs).")
    reduction_factor: int = Field(default=3, ge=2, le=10, description="successive_halving, hyperband: keep the top 1/reduction_factor at each rung.")
    min_early_stopping_rate: int = Field(default=0, ge=0, le=10, description="successive_halving only.")
    n_startup_trials: int = Field(default=5, ge=0, le=1000, description="median: trials completed before it prunes.")
    n_warmup_steps: int = Field(default=1, ge=0, le=1000, description="median: epochs of each trial before it may be pruned.")


def _name_is_sampler(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _name_is_register(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


# Optuna's pruners judge one objective's intermediate values, epoch by epoch.
NO_PRUNING = (
    "Optuna's pruners judge one objective's per-epoch values: they do not support several objectives "
    "or an objective that is not logged every epoch; set pruner to none (or leave it out)"
)


class StudySpec(Spec):
    """A search over trial specs: what varies, how it is sampled and pruned, and the budget."""

    name: str | None = Field(default=None, max_length=200, description="A human name for the study's parent run.")
    base: TrialSpec = Field(default_factory=TrialSpec, description="The trial every sampled configuration starts from.")
    search_space: dict[Annotated[str, Field(min_length=1, max_length=100)], SearchParam] = Field(
        max_length=32,
        description="Dotted trial-spec path -> a range or a choice list, sampled in this order (conditions may refer to earlier keys).",
    )
    objective: ObjectiveSpec | None = Field(default=None, description="One objective (default: maximize val_accuracy); or give objectives.")
    objectives: list[ObjectiveSpec] | None = Field(
        default=None, min_length=1, max_length=4,
        description="Several objectives (a Pareto front), e.g. [{metric: val_accuracy}, {metric: flops_per_sample}]; not with objective.",
    )
    constraints: list[ConstraintSpec] = Field(
        default_factory=list, max_length=16,
        description=(
            "Hard budgets, e.g. {metric: flops_per_sample, max: 2e6}. Sizes (params, flops_per_sample) are checked on each "
            "sampled configuration before it trains (over_budget: never trained); metrics and latencies after training."
        ),
    )
    sampler: Annotated[SamplerSpec, BeforeValidator(_name_is_sampler)] = Field(default_factory=SamplerSpec)
    pruner: Annotated[PrunerSpec, BeforeValidator(_name_is_sampler)] = Field(default_factory=PrunerSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the sampler (each trial's draw is seeded from it).")
    n_trials: int | None = Field(default=None, ge=1, le=10_000, description="Trials to run; default 20, or the whole grid.")
    parallelism: int = Field(default=2, ge=1, le=256, description="Most trials running at once.")
    priority: Priority = Field(
        default="normal", description="Its trials' place among its team's waiting work (high first, then FIFO); never ahead of another team's share.",
    )
    timeout_s: float | None = Field(default=None, gt=0, le=30 * 24 * 3600, description="Start no trial after this long (running ones finish).")
    target: float | None = Field(default=None, allow_inf_nan=False, description="Stop once a trial's value reaches this (in the objective's direction).")
    warm_start: list[dict[str, JsonValue]] = Field(
        default_factory=list, max_length=1000, description="Known configurations (search-space key -> value) to try first.",
    )
    register_as: Annotated[RegisterSpec | None, BeforeValidator(_name_is_register)] = Field(
        default=None,
        description=(
            "Register the chosen trial's model as a new version of this MLflow registered model: a name (the best trial), or "
            "{name, rule: best|knee, metric, where: [{metric, max|min}]}."
        ),
    )
    register_alias: str = Field(default="candidate", min_length=1, max_length=100, pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    tags: dict[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=20, description="Free-form tags copied to the study's parent run.",
    )
    callback_url: HttpUrl | None = Field(
        default=None, description="Receives a POST signed for the team (Standard Webhooks) when the study ends; retried with backoff (docs/api.md). Never written to MLflow.",
    )
    lr_auto: LrAutoSpec | None = Field(
        default=None,
        description=(
            "Run one learning-rate range test of the base trial before the first trial, then search optim.lr log-uniformly "
            "around its suggestion (docs/tuning.md); optim.lr is then not in search_space."
        ),
    )

    @property
    def goals(self) -> list[ObjectiveSpec]:
        """The objectives in order: ``objectives``, else ``objective``, else maximize val_accuracy."""
        return list(self.objectives) if self.objectives else [self.objective or ObjectiveSpec()]

    @property
    def primary(self) -> ObjectiveSpec:
        return self.goals[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.goals) > 1

    @property
    def directions(self) -> list[str]:
        return [g.resolved_direction for g in self.goals]

    @property
    def measures_latency(self) -> bool:
        """Whether its trials must time inference: an objective or constraint names a latency, or the base asks for it."""
        named = {g.metric for g in self.goals} | {c.metric for c in self.constraints}
        if self.register_as is not None:
            named |= {self.register_as.metric or ""} | {w.metric for w in self.register_as.where}
        return self.base.latency is not None or bool(named & set(LATENCY_MEASURES))

    @property
    def selection(self) -> RegisterSpec | None:
        """The rule that chooses the study's trial; None: the best by the (first) objective, or the knee of a two-objective front."""
        return self.register_as

    @property
    def selection_rule(self) -> str:
        """The rule that chooses the study's trial, for a person."""
        if self.register_as is not None:
            return self.register_as.describe(self.primary.metric)
        return "knee of the front" if len(self.goals) == 2 else f"best {self.primary.metric}"

    @property
    def budget(self) -> int:
        """The number of trials to run."""
        if self.n_trials is not None:
            return self.n_trials
        return len(grid_points(self)) if self.sampler.name == "grid" else 20

    @model_validator(mode="before")
    @classmethod
    def _no_default_pruner_without_epochs(cls, data: Any) -> Any:
        # The default pruner cannot judge several objectives or a size: such a study prunes nothing unless told to (then a 422).
        if isinstance(data, dict) and "pruner" not in data:
            raw = data.get("objectives") or [data.get("objective") or {}]
            metrics = [o.get("metric", "val_accuracy") if isinstance(o, dict) else getattr(o, "metric", None) for o in raw] if isinstance(raw, list) else []
            if len(metrics) > 1 or any(m not in EPOCH_MEASURES for m in metrics):
                data = {**data, "pruner": "none"}
        return data

    @model_validator(mode="after")
    def _goals_fit(self) -> StudySpec:
        problems: Problems = []
        if self.objective is not None and self.objectives is not None:
            problems.append((("objectives",), "give objective (one) or objectives (several), not both"))
        metrics = [g.metric for g in self.goals]
        problems += [(("objectives", i, "metric"), f"{m} is already an objective") for i, m in enumerate(metrics) if m in metrics[:i]]
        where = "objectives" if self.objectives else "objective"
        if self.pruner.name != "none" and (self.multi_objective or self.primary.metric not in EPOCH_MEASURES):
            what = f"{len(metrics)} objectives" if self.multi_objective else f"{where}.metric {self.primary.metric}, which is not logged every epoch"
            problems.append((("pruner",), f"this study has {what}: {NO_PRUNING}"))
        if self.target is not None and self.multi_objective:
            problems.append((("target",), "a study with several objectives has no single value to compare with a target: remove target"))
        if self.sampler.name == "cmaes" and self.multi_objective:
            problems.append((("sampler", "name"), "CMA-ES optimises one objective: use tpe, nsga2, gp, random or grid with several"))
        if self.register_as is not None and self.register_as.rule == "knee" and len(metrics) != 2:
            problems.append((("register_as", "rule"), f"the knee is defined on a front of two objectives; this study has {len(metrics)}"))
        bounds: set[str] = set()
        for i, c in enumerate(self.constraints):
            if bounds & set(c.violations(None)):
                problems.append((("constraints", i), f"{c} repeats a bound of an earlier constraint"))
            bounds |= set(c.violations(None))
        if problems:
            raise _invalid(problems)
        return self

    @model_validator(mode="after")
    def _lr_auto_fits(self) -> StudySpec:
        # Tuning: lr_auto adds optim.lr to the space once its range test ran (workers.trial.lr_finder.with_lr_range).
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
            return self  # read back from the study's storage: checked when it was submitted (slow for big spaces: docs/performance.md)
        # The checks of models.spec.space, with the budget's between the values' and the (slowest) combinations'.
        problems = path_problems(self)
        if not problems:
            problems = value_problems(self) + _budget_problems(self)
        if not problems:
            problems = combination_problems(self, builtin_input(self.base.data))
        if not problems:
            problems = constraint_problems(self, self.constraints, builtin_input(self.base.data))
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
