"""What a study's trial measured, and whether it kept within the study's budgets.

A trial's *measures* (:mod:`models.spec.objectives`) are its sizes from the plan (known before it
trains), its last epoch's metrics, the latencies the worker timed, and each objective's value. The
budgets reach Optuna as constraint values (``Trial.set_constraint``: <= 0 met), which TPE, NSGA-II
and GP read, so the sampler learns where the budget's boundary lies; a measure not known (a trial
pruned before its latency was timed) counts as met.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from models.data.roots import DataRoot
from models.data.sets import InvalidData, describe
from models.spec.objectives import EPOCH_MEASURES, LATENCY_MEASURES
from models.spec.plan import InfeasibleArchitecture, NetworkPlan, plan_network
from models.spec.study import StudySpec
from models.spec.trial import TrialSpec
from models.store.runs import TAG

__all__ = [
    "best_epoch_metrics", "broken_budgets", "constrain", "final_measures", "over_budget_reason", "run_measures", "run_sizes", "sizes", "trial_sizes",
]


def sizes(plan: NetworkPlan | None) -> dict[str, float]:
    """The sizes a plan knows before training: parameters and forward FLOPs per sample."""
    return {} if plan is None else {"params": float(plan.params), "flops_per_sample": float(plan.flops)}


def trial_sizes(spec: TrialSpec, data_root: DataRoot | None) -> dict[str, float]:
    """The sizes of a trial spec (a resumed trial, whose plan was not kept); empty when its input cannot be sized."""
    try:
        info = describe(spec.data, data_root)
        return sizes(plan_network(spec.model, info) if info else None)
    except (InvalidData, InfeasibleArchitecture):
        return {}


def broken_budgets(spec: StudySpec, measures: Mapping[str, float]) -> list[str]:
    """Each budget ``measures`` breaks, with the constraint it breaks: ``flops_per_sample 3,145,728 > max 2,000,000 (constraints[0])``."""
    broken = []
    for i, constraint in enumerate(spec.constraints):
        value = measures.get(constraint.metric)
        why = None if value is None else constraint.broken_by(value)
        if why:
            broken.append(f"{why} (constraints[{i}])")
    return broken


def over_budget_reason(broken: Sequence[str], measures: Mapping[str, float]) -> str:
    """Why a sampled configuration was not trained, with its sizes."""
    shown = ", ".join(f"{measures[k]:,.0f} {k}" for k in ("params", "flops_per_sample") if k in measures)
    return f"over budget, never trained: {'; '.join(broken)}; its sizes: {shown}"


def constrain(trial: optuna.Trial, spec: StudySpec, measures: Mapping[str, float]) -> None:
    """Tell Optuna the trial's constraint values (one per bound; an unknown measure counts as met)."""
    for constraint in spec.constraints:
        for key, value in constraint.violations(measures.get(constraint.metric)).items():
            trial.set_constraint(key, value)


def final_measures(spec: StudySpec, history: Sequence[Mapping[str, float]], known_sizes: Mapping[str, float], logged: Mapping[str, Any]) -> dict[str, float]:
    """Everything measured of a trial that trained: sizes, its last epoch's metrics, timed latencies, each objective's value.

    ``history`` is every epoch the trial trained, those before a resume included (a ``best_epoch``
    objective is judged over all of them).
    """
    series = {metric: [h[metric] for h in history] for metric in best_epoch_metrics(spec)}
    return _measures(spec, history[-1] if history else {}, series, known_sizes, logged)


def run_measures(spec: StudySpec, metrics: Mapping[str, float], series: Mapping[str, Sequence[float]], known_sizes: Mapping[str, float]) -> dict[str, float]:
    """What :func:`final_measures` gives, rebuilt from an ended run: its last metrics and, per ``best_epoch`` objective, that metric's epochs."""
    return _measures(spec, metrics, series, known_sizes, metrics)


def run_sizes(tags: Mapping[str, str]) -> dict[str, float]:
    """The sizes a trial's run was created with (its plan's, in tags): none when its input could not be sized."""
    found = {"params": tags.get(TAG.PARAMS_COUNT), "flops_per_sample": tags.get(TAG.FLOPS)}
    return {k: float(v) for k, v in found.items() if v is not None}


def best_epoch_metrics(spec: StudySpec) -> list[str]:
    """The metrics an objective judges at their best epoch, not the last."""
    return [g.metric for g in spec.goals if g.metric in EPOCH_MEASURES and g.value == "best_epoch"]


def _measures(
    spec: StudySpec, last: Mapping[str, float], series: Mapping[str, Sequence[float]], known_sizes: Mapping[str, float], logged: Mapping[str, Any],
) -> dict[str, float]:
    measures = {**known_sizes, **{k: float(v) for k, v in last.items() if k in EPOCH_MEASURES}}
    measures.update({k: float(logged[k]) for k in LATENCY_MEASURES if k in logged})
    for goal in spec.goals:
        values = series.get(goal.metric)
        if goal.metric in EPOCH_MEASURES and goal.value == "best_epoch" and values:
            better = max if goal.resolved_direction == "maximize" else min
            measures[goal.metric] = float(better(values))
    return measures
