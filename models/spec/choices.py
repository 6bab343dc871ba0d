"""The vocabulary of named choices: every value a spec field takes from a fixed list, as data.

One table per concept (activations, norms, downsampling, optimizers, schedules, samplers, pruners):
the name a client writes, a one-line description, and the spec options that choice reads. The
spec's Literals are generated from these tables (``Literal[tuple(ACTIVATIONS)]``), so the JSON
schema is an enum of exactly these names, in this order. The code that builds each choice keeps
its own table keyed by the same names (:mod:`models.nets.convnet`, :mod:`workers.training.train`,
:mod:`models.store.search`); ``tests/test_registries.py`` fails when the two disagree, and
:func:`lookup` makes a name missing from a factory table an error naming the known ones, never a
fallback. The docs' tables of these choices are rendered here (:func:`render_table`) and kept in
step by ``python -m models.spec.docs``. This module must not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "ACTIVATIONS",
    "CONCEPTS",
    "DOWNSAMPLING",
    "NORMS",
    "OPTIMIZERS",
    "PRUNERS",
    "SAMPLERS",
    "SCHEDULES",
    "Choice",
    "Concept",
    "lookup",
    "render_table",
    "rendered_docs",
]


@dataclass(frozen=True)
class Choice:
    """One name a spec field accepts: what it does, and the spec options it reads (besides the name)."""

    description: str
    options: tuple[str, ...] = ()


ACTIVATIONS: dict[str, Choice] = {
    "relu": Choice("max(0, x)"),
    "leaky_relu": Choice("x for x > 0, else 0.01 x"),
    "gelu": Choice("x times the standard normal CDF of x"),
    "silu": Choice("x times sigmoid(x) (swish)"),
    "elu": Choice("x for x > 0, else exp(x) - 1"),
    "tanh": Choice("hyperbolic tangent, bounded to (-1, 1)"),
    "sigmoid": Choice("logistic function, bounded to (0, 1)"),
}
NORMS: dict[str, Choice] = {
    "batch": Choice("batch norm: per channel, over the batch and the map"),
    "group": Choice("group norm: per sample, over groups of channels", ("norm_groups",)),
    "none": Choice("no normalisation; the convs get a bias"),
}
DOWNSAMPLING: dict[str, Choice] = {
    "stride": Choice("the first conv of each stage after the first has stride 2"),
    "maxpool": Choice("a 2x2 max pool, stride 2, before each stage after the first"),
    "avgpool": Choice("a 2x2 average pool, stride 2, before each stage after the first"),
    "dilation": Choice("no downsampling: stage i (from 1) dilates its convs by `2**(i-1)`"),
}
OPTIMIZERS: dict[str, Choice] = {
    "sgd": Choice("plain stochastic gradient descent"),
    "momentum": Choice("SGD with heavy-ball momentum (default 0.9)", ("momentum",)),
    "nesterov": Choice("SGD with Nesterov momentum (default 0.9)", ("momentum",)),
    "adam": Choice("Adam, weight decay added to the gradient", ("betas",)),
    "adamw": Choice("Adam with decoupled weight decay", ("betas",)),
    "rmsprop": Choice("RMSprop (momentum default 0)", ("momentum",)),
}
SCHEDULES: dict[str, Choice] = {
    "none": Choice("constant lr after the warm-up"),
    "step": Choice("lr times gamma every step_size epochs", ("step_size", "gamma")),
    "cosine": Choice("cosine from lr to 0 at the last step"),
    "onecycle": Choice("one cycle: up to lr and down to almost 0 (its own warm-up; no warmup_epochs)"),
    "exponential": Choice("lr times gamma every epoch", ("gamma",)),
}
SAMPLERS: dict[str, Choice] = {
    "tpe": Choice("Tree-structured Parzen Estimator; constant liar when parallel", ("n_startup_trials", "multivariate")),
    "random": Choice("independent uniform draws"),
    "grid": Choice("every point of an enumerable space, each once"),
    "cmaes": Choice("CMA evolution strategy; one objective only", ("n_startup_trials",)),
    "gp": Choice("Gaussian-process Bayesian optimisation", ("n_startup_trials",)),
    "nsga2": Choice("NSGA-II genetic search of a Pareto front", ("population_size",)),
}
PRUNERS: dict[str, Choice] = {
    "none": Choice("never prunes"),
    "median": Choice("prunes a trial below the median of earlier trials at the same epoch", ("n_startup_trials", "n_warmup_steps")),
    "successive_halving": Choice(
        "ASHA: keeps the top 1/reduction_factor at each rung", ("min_resource", "reduction_factor", "min_early_stopping_rate"),
    ),
    "hyperband": Choice("successive halving over several brackets", ("min_resource", "max_resource", "reduction_factor")),
}


@dataclass(frozen=True)
class Concept:
    """A table of choices and the spec field that takes one of its names."""

    field: str
    choices: dict[str, Choice]


# The marker name in the docs (<!-- choices:activations -->) -> the concept.
CONCEPTS: dict[str, Concept] = {
    "activations": Concept("model.activation", ACTIVATIONS),
    "norms": Concept("model.norm", NORMS),
    "downsampling": Concept("model.downsample", DOWNSAMPLING),
    "optimizers": Concept("optim.optimizer", OPTIMIZERS),
    "schedules": Concept("optim.schedule", SCHEDULES),
    "samplers": Concept("sampler.name", SAMPLERS),
    "pruners": Concept("pruner.name", PRUNERS),
}

T = TypeVar("T")


def lookup(table: dict[str, T], name: str, what: str) -> T:
    """``table[name]``, or a ValueError naming ``what`` was asked for and every known name."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}") from None


def render_table(concept: str) -> str:
    """The markdown table of a concept's choices, as the docs hold it between its markers."""
    c = lookup(CONCEPTS, concept, "concept")
    rows = [f"| `{c.field}` | what it does | spec options |", "|---|---|---|"]
    for name, choice in c.choices.items():
        options = ", ".join(f"`{o}`" for o in choice.options) or "-"
        rows.append(f"| `{name}` | {choice.description} | {options} |")
    return "\n".join(rows)


# A docs section: <!-- choices:NAME --> the table <!-- /choices:NAME -->, each marker on a line of its own.
MARKED = re.compile(r"<!-- choices:(?P<name>[a-z_]+) -->\n.*?<!-- /choices:(?P=name) -->", re.DOTALL)


def rendered_docs(text: str) -> str:
    """``text`` with every marked section holding its concept's current table (:mod:`models.spec.docs` writes it)."""
    return MARKED.sub(lambda m: f"<!-- choices:{m['name']} -->\n{render_table(m['name'])}\n<!-- /choices:{m['name']} -->", text)
