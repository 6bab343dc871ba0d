"""Optuna glue the API and the workers share: storages, the space as distributions, samplers, pruners.

Samplers and pruners are not stored by Optuna: every worker step rebuilds them from the study spec
(:func:`make_sampler`, :func:`make_pruner`). Budgets reach the samplers as Optuna constraints
(``Trial.set_constraint``, which Optuna 5 reads in place of the deprecated ``constraints_func``);
:func:`candidates`, :func:`front` and :func:`chosen` read a study's results back for the spec's rules. A categorical parameter whose choices are not plain
scalars (``model.channels: [[16, 32], [32, 64]]``) travels through Optuna as JSON strings and is
decoded by :func:`decode_params`. This module imports optuna but never torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from models.compat import optuna_storage
from models.spec.choices import lookup
from models.spec.objectives import Candidate, choose, pareto_front
from models.spec.space import CategoricalParam, FloatParam, IntParam, condition_met, param_values
from models.spec.study import StudySpec

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "TRIAL_STATES",
    "USER_ATTR",
    "candidates",
    "chosen",
    "decode_params",
    "encode_params",
    "fail_trial",
    "front",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "storage_kind",
    "suggest",
    "trial_label",
]

optuna.logging.set_verbosity(optuna.logging.WARNING)


# Optuna trial states (TrialState names) as convtune shows them.
TRIAL_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "fail", "RUNNING": "running", "WAITING": "waiting"}


class USER_ATTR:
    """Optuna user-attribute keys convtune writes on studies and trials."""

    SPEC = "convtune.spec"  # study: the StudySpec as JSON
    BUDGET = "convtune.n_trials"  # study: trials to run (grows with /extend)
    QUEUE = "convtune.queue"  # study: where its steps run
    STARTED_AT = "convtune.started_at"  # study: epoch seconds its clock (timeout) started, reset by /extend
    STOPPED = "convtune.stopped"  # study: why no more trials start (cancelled, target reached, timeout)
    TRIAL_ID = "convtune.trial_id"  # trial: its MLflow child run id
    OUTCOME = "convtune.outcome"  # trial: convtune's outcome (succeeded, pruned, diverged, ...)
    REASON = "convtune.reason"
    EPOCHS = "convtune.epochs_done"
    DUPLICATE_OF = "convtune.duplicate_of"  # trial: number of the trial whose result it reused
    SLOT = "convtune.slot"
    LR_AUTO = "convtune.lr_auto"  # study: the range its lr_auto range test found, or why none was
    MEASURES = "convtune.measures"  # trial: {measure: value} of its sizes, last metrics and latencies (models.spec.objectives)
    OVER_BUDGET = "convtune.over_budget"  # trial: the budgets it broke (before training: never trained; after: not chosen)


def storage_kind(url: str) -> str:
    """``journal`` for a file path, else the database's name (``postgresql``)."""
    return url.split(":", 1)[0].split("+", 1)[0] if "://" in url else "journal"


_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A journal file (a path: one host, many processes) or an RDB storage (a database URL: many hosts).

    One per process and URL: the journal storage replays its log incrementally, the RDB storage
    keeps a connection pool. A forked child opens its own (:func:`_forget_storages`).
    """
    storage = _STORAGES.get(url)
    if storage is None:
        storage = _STORAGES[url] = _open_storage(url)
    return storage


def _forget_storages() -> None:
    """After a fork, in the child: drop the parent's storages, never using or closing what they hold.

    Celery's prefork pool forks a replacement training process from the worker's main process, where
    the reconciler has used the storage: the child would share the parent's database sockets, and a
    journal storage's lock may have been held by a parent thread at the moment of the fork.
    ``dispose(close=False)`` leaves the parent's connections to the parent (SQLAlchemy's advice for
    forked children).
    """
    for storage in _STORAGES.values():
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose(close=False)
    _STORAGES.clear()


os.register_at_fork(after_in_child=_forget_storages)


def _open_storage(url: str) -> optuna.storages.BaseStorage:
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; convtune ships psycopg 3.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def distribution(param: FloatParam | IntParam | CategoricalParam) -> optuna.distributions.BaseDistribution:
    if isinstance(param, FloatParam):
        return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return optuna.distributions.IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return optuna.distributions.CategoricalDistribution(_encoded_choices(param))


def _encoded_choices(param: CategoricalParam) -> list[Any]:
    return list(param.choices) if param.scalar else [json.dumps(c, sort_keys=True) for c in param.choices]


def encode_params(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    """Search-space values as Optuna stores them (non-scalar choices as JSON strings)."""
    out = {}
    for key, value in params.items():
        param = spec.search_space[key]
        out[key] = json.dumps(value, sort_keys=True) if isinstance(param, CategoricalParam) and not param.scalar else value
    return out


def decode_params(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's stored values back as trial-spec values."""
    out = {}
    for key, value in params.items():
        param = spec.search_space.get(key)
        out[key] = json.loads(value) if isinstance(param, CategoricalParam) and not param.scalar else value
    return out


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Sample the space in its order, skipping parameters whose condition fails; trial-spec values."""
    base = spec.base.model_dump(mode="json")
    values: dict[str, Any] = {}
    for key, param in spec.search_space.items():
        if not condition_met(param.when, values, base):
            continue
        if isinstance(param, FloatParam):
            values[key] = trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, IntParam):
            values[key] = trial.suggest_int(key, param.low, param.high, log=param.log, step=param.step)
        else:
            chosen = trial.suggest_categorical(key, _encoded_choices(param))
            values[key] = chosen if param.scalar else json.loads(chosen)
    return values


# (study spec, seed) -> sampler, one per name of models.spec.choices.SAMPLERS; each reads its options from spec.sampler.
SAMPLERS: dict[str, Callable[[StudySpec, int], optuna.samplers.BaseSampler]] = {
    # The constant liar keeps parallel steps from sampling next to each other's running trials.
    "tpe": lambda spec, seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.sampler.n_startup_trials, multivariate=spec.sampler.multivariate,
        group=spec.sampler.multivariate, constant_liar=spec.parallelism > 1,
    ),
    "random": lambda spec, seed: optuna.samplers.RandomSampler(seed=seed),
    # A grid's points are all enqueued when the study is created (service.api.studies.accept): nothing is left to sample.
    "grid": lambda spec, seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda spec, seed: optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=spec.sampler.n_startup_trials, warn_independent_sampling=False,
    ),
    "gp": lambda spec, seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials),
    "nsga2": lambda spec, seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=spec.sampler.population_size),
}


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded with ``seed`` (the study's seed plus the step's slot, so draws differ).

    Raises ValueError naming the known samplers for a name :data:`SAMPLERS` lacks.
    """
    return lookup(SAMPLERS, spec.sampler.name, "sampler")(spec, seed)


def _hyperband(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Hyperband up to the longest trial the study can sample, unless max_resource says otherwise."""
    p, searched = spec.pruner, spec.search_space.get("optim.epochs")
    epochs = max(param_values(searched)) if searched else spec.base.optim.epochs
    return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=p.max_resource or epochs, reduction_factor=p.reduction_factor)


# study spec -> pruner, one per name of models.spec.choices.PRUNERS; each reads its options from spec.pruner.
PRUNERS: dict[str, Callable[[StudySpec], optuna.pruners.BasePruner]] = {
    "none": lambda spec: optuna.pruners.NopPruner(),
    "median": lambda spec: optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.n_startup_trials, n_warmup_steps=spec.pruner.n_warmup_steps),
    "successive_halving": lambda spec: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=spec.pruner.min_resource, reduction_factor=spec.pruner.reduction_factor,
        min_early_stopping_rate=spec.pruner.min_early_stopping_rate,
    ),
    "hyperband": _hyperband,
}


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner; raises ValueError naming the known pruners for a name :data:`PRUNERS` lacks."""
    return lookup(PRUNERS, spec.pruner.name, "pruner")(spec)


def candidates(study: optuna.Study, spec: StudySpec) -> list[Candidate]:
    """The study's completed trials that trained (a duplicate only reused its twin's result), as the spec's rules see them."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get(USER_ATTR.DUPLICATE_OF) is not None or t.values is None:
            continue
        measures = {k: float(v) for k, v in (t.user_attrs.get(USER_ATTR.MEASURES) or {}).items() if v is not None}
        for goal, value in zip(spec.goals, t.values, strict=False):
            measures.setdefault(goal.metric, float(value))
        feasible = all(v <= 0 for v in t.constraints.values())
        out.append(Candidate(t.number, tuple(float(v) for v in t.values), measures, feasible))
    return out


def front(study: optuna.Study, spec: StudySpec) -> list[Candidate]:
    """The Pareto front of the study's feasible trials (with one objective: its best trial)."""
    found = candidates(study, spec)
    if not spec.multi_objective:
        best = choose(found, spec.goals)
        return [best] if best else []
    return pareto_front(found, spec.directions)


def chosen(study: optuna.Study, spec: StudySpec) -> optuna.trial.FrozenTrial | None:
    """The trial the spec's rule chooses (register_as's, else the best, or the knee of a two-objective front); None when none qualifies."""
    rule = spec.selection
    if rule is not None:
        pick = choose(candidates(study, spec), spec.goals, rule=rule.rule, metric=rule.metric, direction=rule.direction, where=rule.where)
    else:
        pick = choose(candidates(study, spec), spec.goals, rule="knee" if len(spec.goals) == 2 else "best")
    return None if pick is None else study.get_trials(deepcopy=False)[pick.number]


# Short labels of the usual parameters, so a list of runs reads "lr=3e-3 bs=32 k3 maxpool relu".
_LABELS = {
    "optim.lr": lambda v: f"lr={_short_float(v)}",
    "optim.batch_size": lambda v: f"bs={v}",
    "model.kernel_size": lambda v: f"k{v}",
    "model.downsample": str,
    "model.activation": str,
    "optim.optimizer": str,
}


def trial_label(params: dict[str, Any]) -> str:
    """A readable name from a trial's sampled parameters, the usual ones first."""
    ordered = [k for k in _LABELS if k in params] + [k for k in params if k not in _LABELS]
    parts = []
    for key in ordered:
        value = params[key]
        if key in _LABELS:
            parts.append(_LABELS[key](value))
        else:
            shown = _short_float(value) if isinstance(value, float) else json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else value
            parts.append(f"{key.rsplit('.', 1)[-1]}={shown}")
    return " ".join(parts)


def _short_float(value: float) -> str:
    """3e-3, 3.5e-3, 0.25: two significant digits, no exponent padding."""
    if value == 0 or 1e-2 <= abs(value) < 1e3:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def fail_trial(stored: optuna.Study, number: int, outcome: str, reason: str) -> bool:
    """Fail trial ``number`` with convtune's ``outcome`` and ``reason`` (Optuna keeps neither) if it still runs; whether it did.

    The one way a running trial is failed outside its objective: a step given up, a trial lost for
    good, one a dead step never started, a cancel that finds no worker holding it.
    """
    storage = optuna_storage.storage(stored)
    optuna_id = optuna_storage.trial_id(stored, number)
    if storage.get_trial(optuna_id).state != optuna.trial.TrialState.RUNNING:
        return False
    storage.set_trial_user_attr(optuna_id, USER_ATTR.OUTCOME, outcome)
    storage.set_trial_user_attr(optuna_id, USER_ATTR.REASON, reason[:1000])
    storage.set_trial_state_values(optuna_id, optuna.trial.TrialState.FAIL)
    return True
