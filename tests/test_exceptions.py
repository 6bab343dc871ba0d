"""Every exception our code defines sits in its process's one documented tree (STYLE.md, principle 10).

Every module of models/, service/ and workers/ is imported (none needs a GPU to be imported) and
each exception class defined there must derive from its part's root and be drawn, by name, in the
tree at the top of that root's module:

    models.*       ConvtuneError   models/errors.py        what both processes share
    workers.*      WorkerError     workers/errors.py       (a ConvtuneError)
    service.api.*  ConvtuneError   service/api/errors.py   ApiError and its problem answers
    service.client ClientError     service/client.py       the light client imports nothing of models
    service.cli.*  ClickException  (click's own tree)      click prints the message and exits with its code

The workers' control-flow signals that derive from BaseException on purpose are listed here by
name, and drawn in workers/errors.py as outside the tree.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from functools import cache
from types import ModuleType

import click

from models.errors import ConvtuneError
from service.client import ClientError
from workers.errors import WorkerError

PACKAGES = ("models", "service", "workers")

# (module prefix, the root its exceptions derive from, the module whose docstring draws the tree);
# the longest matching prefix wins. A module no prefix covers has no tree yet: its exceptions fail.
TREES: tuple[tuple[str, type[BaseException], str | None], ...] = (
    ("models", ConvtuneError, "models.errors"),
    ("workers", WorkerError, "workers.errors"),
    ("service.api", ConvtuneError, "service.api.errors"),
    ("service.client", ClientError, "service.client"),
    ("service.cli", click.ClickException, None),
)

# BaseException on purpose: Optuna's study.optimize records every Exception as a failed trial and
# lets these through (workers/study/step.py).
CONTROL_FLOW = {"workers.study.step.StepInterrupted", "workers.study.step._EndedEarlier"}

# Classes the discovery must find: an empty or partial discovery would let every check pass.
KNOWN = {
    "models.spec.plan.InfeasibleArchitecture", "models.store.claims.ClaimRefused", "models.compat._base.CompatError",
    "service.api.errors.InfeasibleSpec", "service.client.Unreachable", "service.cli.runs.ApiProblemNotFound",
    "workers.training.parallel.RankFailed", "workers.callbacks.delivery.RefusedDestination", *CONTROL_FLOW,
}


def all_modules() -> list[ModuleType]:
    """Every module of our packages, imported."""
    modules = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules.append(package)
        modules += [importlib.import_module(info.name) for info in pkgutil.walk_packages(package.__path__, f"{name}.")]
    return modules


@cache
def our_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined at the top of one of our modules, by its dotted name."""
    found = {}
    for module in all_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def tree_of(qualified: str) -> tuple[type[BaseException], str | None] | None:
    """The root and the drawing module of the exception called ``qualified``; None when no tree covers its module."""
    module = qualified.rsplit(".", 1)[0]
    covering = [tree for tree in TREES if module == tree[0] or module.startswith(tree[0] + ".")]
    if not covering:
        return None
    _, root, drawing = max(covering, key=lambda tree: len(tree[0]))
    return root, drawing


def drawn_names(module_name: str) -> set[str]:
    """The class names drawn in the tree of ``module_name``'s docstring: a line's first word, or the word after ``+--``."""
    doc = sys.modules[module_name].__doc__ or ""
    return set(re.findall(r"^ {4,}(?:[ |]*\+-- )?(_?[A-Z]\w*)", doc, re.MULTILINE))


def test_the_discovery_finds_every_part_of_the_code() -> None:
    assert KNOWN <= set(our_exceptions()), f"not found: {sorted(KNOWN - set(our_exceptions()))}"


def test_every_exception_derives_from_its_process_root() -> None:
    stray = []
    for qualified, cls in our_exceptions().items():
        tree = tree_of(qualified)
        if tree is None:
            stray.append(f"{qualified}: no tree covers its module (add one to TREES, and its drawing)")
        elif qualified in CONTROL_FLOW:
            if issubclass(cls, Exception):
                stray.append(f"{qualified}: listed as a control-flow signal but is an Exception (derive it from {tree[0].__name__})")
        elif not issubclass(cls, tree[0]):
            stray.append(f"{qualified}: derives from {[base.__name__ for base in cls.__bases__]}, not {tree[0].__name__}")
    assert not stray, "exceptions outside their process's tree:\n" + "\n".join(stray)


def test_every_exception_is_drawn_in_its_tree() -> None:
    missing = []
    for qualified, cls in our_exceptions().items():
        tree = tree_of(qualified)
        if tree is not None and tree[1] is not None and cls.__name__ not in drawn_names(tree[1]):
            missing.append(f"{qualified}: not drawn in the docstring of {tree[1]}")
    assert not missing, "\n".join(missing)


def test_every_drawn_name_is_an_exception_of_ours() -> None:
    names = {cls.__name__ for cls in our_exceptions().values()}
    stale = [f"{drawing}: {name}" for drawing in {tree[2] for tree in TREES if tree[2]} for name in drawn_names(drawing) - names]
    assert not stale, "drawn but not defined (renamed or removed?):\n" + "\n".join(sorted(stale))


def test_the_workers_tree_is_part_of_the_shared_one() -> None:
    from service.api.errors import ApiError

    assert issubclass(WorkerError, ConvtuneError)
    assert issubclass(ApiError, ConvtuneError)
    assert not issubclass(ClientError, ConvtuneError), "the client stays light: its errors are not models'"
