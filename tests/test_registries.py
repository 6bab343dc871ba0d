"""The vocabulary of models.spec.choices and the factory tables that build it agree, name for name.

For each concept, the spec's Literal is the choices' names in their order, the factory table has
exactly those names (a name added to the spec only, or to a table only, fails here), and every
name builds: a tiny ConvNet runs forward for every activation, norm and downsampling; every
optimizer and schedule takes one step; every sampler and pruner asks one trial of an in-memory
Optuna study. The plan's sizing tables (norms, downsampling) have the same names as the modules'.
The docs hold the current rendering of every concept's table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import optuna
import pytest
import torch

from models.nets import convnet
from models.spec import docs, plan
from models.spec.choices import CONCEPTS, lookup, render_table, rendered_docs
from models.spec.plan import InputInfo, stage_geometry
from models.spec.study import PrunerSpec, SamplerSpec, StudySpec
from models.spec.trial import ConvNetSpec, OptimSpec
from models.store import search
from workers.training import train

ROOT = Path(__file__).resolve().parents[1]

# concept -> (the factory table keyed by its names, the spec class whose field takes one, that field).
REGISTRIES: dict[str, tuple[dict[str, Any], type, str]] = {
    "activations": (convnet.ACTIVATIONS, ConvNetSpec, "activation"),
    "norms": (convnet.NORMS, ConvNetSpec, "norm"),
    "downsampling": (convnet.DOWNSAMPLING, ConvNetSpec, "downsample"),
    "optimizers": (train.OPTIMIZERS, OptimSpec, "optimizer"),
    "schedules": (train.SCHEDULES, OptimSpec, "schedule"),
    "samplers": (search.SAMPLERS, SamplerSpec, "name"),
    "pruners": (search.PRUNERS, PrunerSpec, "name"),
}
# concept -> models.spec.plan's sizing table keyed by its names (the plan sizes what convnet builds).
PLAN_TABLES: dict[str, dict[str, Any]] = {"norms": plan.NORM_PARAMS, "downsampling": plan.DOWNSAMPLING_GEOMETRY}
DIGITS = InputInfo(channels=1, height=8, width=8, num_classes=10)


def names(concept: str) -> list[str]:
    return list(CONCEPTS[concept].choices)


def test_every_concept_has_a_factory_table() -> None:
    assert set(REGISTRIES) == set(CONCEPTS)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_the_factory_table_has_exactly_the_specs_names(concept: str) -> None:
    table, _, _ = REGISTRIES[concept]
    spec_names = set(names(concept))
    assert set(table) == spec_names, (
        f"{concept}: in models.spec.choices only: {sorted(spec_names - set(table))}; in the factory table only: {sorted(set(table) - spec_names)}"
    )


@pytest.mark.parametrize("concept", sorted(PLAN_TABLES))
def test_the_plans_sizing_table_has_exactly_the_specs_names(concept: str) -> None:
    spec_names, table = set(names(concept)), PLAN_TABLES[concept]
    assert set(table) == spec_names, (
        f"{concept}: in models.spec.choices only: {sorted(spec_names - set(table))}; in models.spec.plan only: {sorted(set(table) - spec_names)}"
    )


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_the_specs_literal_is_generated_from_the_choices(concept: str) -> None:
    _, spec_class, field = REGISTRIES[concept]
    assert CONCEPTS[concept].field.endswith(f".{field}")
    assert get_args(spec_class.model_fields[field].annotation) == tuple(names(concept))


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_the_options_a_choice_reads_are_fields_of_its_spec(concept: str) -> None:
    _, spec_class, _ = REGISTRIES[concept]
    for name, choice in CONCEPTS[concept].choices.items():
        assert set(choice.options) <= set(spec_class.model_fields), f"{concept} {name!r} reads options its spec lacks"


@pytest.mark.parametrize("spec_class", [SamplerSpec, PrunerSpec])
def test_every_sampler_and_pruner_option_is_read_by_some_choice(spec_class: type) -> None:
    concept = "samplers" if spec_class is SamplerSpec else "pruners"
    read = {option for choice in CONCEPTS[concept].choices.values() for option in choice.options}
    assert set(spec_class.model_fields) - {"name"} == read


def test_an_unknown_name_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"^unknown sampler 'annealing'; known: cmaes, gp, grid, nsga2, random, tpe$"):
        lookup(search.SAMPLERS, "annealing", "sampler")
    unvalidated = StudySpec.model_construct(**{**minimal_study("tpe").model_dump(), "sampler": SamplerSpec.model_construct(name="annealing")})
    with pytest.raises(ValueError, match="unknown sampler 'annealing'"):
        search.make_sampler(unvalidated, 0)
    unvalidated = StudySpec.model_construct(**{**minimal_study("tpe").model_dump(), "pruner": PrunerSpec.model_construct(name="patient")})
    with pytest.raises(ValueError, match="unknown pruner 'patient'"):
        search.make_pruner(unvalidated)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        train.make_scheduler(train.make_optimizer([torch.nn.Parameter(torch.ones(1))], OptimSpec()), OptimSpec.model_construct(**{**OptimSpec().model_dump(), "schedule": "linear"}), 1)


@pytest.mark.parametrize(
    ("field", "name"),
    [("activation", n) for n in names("activations")] + [("norm", n) for n in names("norms")] + [("downsample", n) for n in names("downsampling")],
)
def test_every_layer_choice_builds_a_net_that_runs_forward(field: str, name: str) -> None:
    torch.manual_seed(0)
    net = convnet.build_model(ConvNetSpec(channels=[4, 8], convs_per_stage=1, norm_groups=2, **{field: name}), DIGITS).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    if field == "downsample":
        assert ("pool" in dict(net.features.stage2.named_children())) == stage_geometry(name, 2).pool


@pytest.mark.parametrize("name", names("optimizers"))
def test_every_optimizer_takes_one_step(name: str) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = train.make_optimizer([param], OptimSpec(optimizer=name, lr=0.1))
    (param**2).sum().backward()
    optimizer.step()
    assert (param.detach() < 1).all(), f"{name} did not step against the gradient"


@pytest.mark.parametrize("name", names("schedules"))
def test_every_schedule_takes_one_step(name: str) -> None:
    optim = OptimSpec(schedule=name, lr=0.1, epochs=4)
    optimizer = train.make_optimizer([torch.nn.Parameter(torch.ones(1))], optim)
    scheduler = train.make_scheduler(optimizer, optim, steps_per_epoch=2)
    optimizer.step()
    scheduler.step()
    assert 0 < optimizer.param_groups[0]["lr"] <= 0.1
    assert scheduler.last_epoch == 1


def minimal_study(sampler: str, pruner: str = "none") -> StudySpec:
    return StudySpec.model_validate({
        "base": {"model": {"channels": [4, 8], "convs_per_stage": 1}, "optim": {"epochs": 3}},
        "search_space": {"optim.lr": [0.001, 0.01], "model.kernel_size": {"type": "int", "low": 1, "high": 3, "step": 2}},
        "sampler": sampler, "pruner": pruner,
    })


def ask_one_trial(spec: StudySpec) -> optuna.Trial:
    study = optuna.create_study(sampler=search.make_sampler(spec, 0), pruner=search.make_pruner(spec), direction="maximize")
    trial = study.ask()
    assert set(search.suggest(trial, spec)) == set(spec.search_space)
    return trial


@pytest.mark.parametrize("name", names("samplers"))
def test_every_sampler_asks_one_trial(name: str) -> None:
    trial = ask_one_trial(minimal_study(name))
    assert isinstance(trial.study.sampler, optuna.samplers.BaseSampler)


@pytest.mark.parametrize("name", names("pruners"))
def test_every_pruner_judges_one_trial(name: str) -> None:
    trial = ask_one_trial(minimal_study("random", name))
    trial.report(0.5, step=1)
    assert isinstance(trial.study.pruner, optuna.pruners.BasePruner) and trial.should_prune() in (True, False)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_the_rendered_table_lists_every_choice_once(concept: str) -> None:
    rows = render_table(concept).splitlines()[2:]
    assert [re.match(r"^\| `([a-z_0-9]+)` \|", row).group(1) for row in rows] == names(concept)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_the_docs_hold_the_current_table_of_every_concept(concept: str) -> None:
    marked = f"<!-- choices:{concept} -->\n{render_table(concept)}\n<!-- /choices:{concept} -->"
    holding = [p for p in docs.doc_files(ROOT) if marked in p.read_text(encoding="utf-8")]
    assert holding, f"no doc holds the current {concept} table: run python -m models.spec.docs"


@pytest.mark.parametrize("path", docs.doc_files(ROOT), ids=lambda p: p.name)
def test_no_doc_holds_a_stale_table(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert rendered_docs(text) == text, f"{path.name} has a stale table of choices: run python -m models.spec.docs"
