"""The study spec: search-space paths, ranges and feasibility are checked at validation, naming the field."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from models.spec.space import CategoricalParam, apply_params, grid_points
from models.spec.study import StudySpec
from models.spec.trial import NON_HYPERPARAMETERS, TrialSpec, flatten_params
from models.store.search import decode_params, encode_params, make_pruner, make_sampler, storage_kind, suggest, trial_label

BASE = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"epochs": 4}, "data": {"name": "digits"}}


def study(**fields: Any) -> StudySpec:
    return StudySpec.model_validate({"base": BASE, "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}, **fields})


def errors_of(**fields: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        study(**fields)
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in caught.value.errors(include_url=False)}


def test_defaults_tpe_asha_twenty_trials_maximising_val_accuracy() -> None:
    spec = study()
    assert (spec.sampler.name, spec.pruner.name, spec.budget, spec.parallelism) == ("tpe", "successive_halving", 20, 2)
    assert spec.objective.metric == "val_accuracy" and spec.objective.resolved_direction == "maximize"
    assert StudySpec.model_validate({**spec.model_dump(), "objective": {"metric": "val_loss"}}).objective.resolved_direction == "minimize"


def test_the_default_pruner_accepts_one_epoch_trials() -> None:
    assert study(base={**BASE, "optim": {"epochs": 1}}).pruner.name == "successive_halving"


def test_shorthands_a_list_is_a_choice_and_a_name_is_a_sampler_or_pruner() -> None:
    spec = study(search_space={"model.activation": ["relu", "gelu"]}, sampler="random", pruner="none")
    assert isinstance(spec.search_space["model.activation"], CategoricalParam)
    assert spec.sampler.name == "random" and spec.pruner.name == "none"


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        pytest.param({"search_space": {"optim.lrr": [1e-3]}}, "search_space.optim.lrr", "optim has no field 'lrr'", id="unknown-field"),
        pytest.param({"search_space": {"nope.lr": [1e-3]}}, "search_space.nope.lr", "the trial spec has no field 'nope'", id="unknown-section"),
        pytest.param({"search_space": {"data.val_fraction": [0.1, 0.2]}}, "search_space.data.val_fraction", "cannot be searched", id="data-is-fixed"),
        pytest.param({"search_space": {"callback_url": ["https://a.example/hook", "https://b.example/hook"]}}, "search_space.callback_url", "not a hyperparameter", id="callback-url-is-not-a-hyperparameter"),
        pytest.param({"search_space": {"queue": ["cpu", "gpu"]}}, "search_space.queue", "not a hyperparameter", id="queue-is-not-a-hyperparameter"),
        pytest.param({"search_space": {"model.activation": {"type": "float", "low": 0, "high": 1}}}, "search_space.model.activation", "not a number", id="range-on-choice-field"),
        pytest.param({"search_space": {"model.kernel_size": {"type": "float", "low": 1, "high": 3}}}, "search_space.model.kernel_size.type", "integer field", id="float-range-on-int"),
        pytest.param({"search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 20}}}, "search_space.optim.lr.high", "less than or equal to 10", id="above-bound"),
        pytest.param({"search_space": {"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "search_space.optim.lr.float", "needs low > 0", id="log-from-zero"),
        pytest.param({"search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "step": 5e-324}}}, "search_space.optim.lr.float", "too small", id="subnormal-step"),
        pytest.param({"search_space": {"model.kernel_size": {"type": "int", "low": 3, "high": 5}}}, "search_space.model.kernel_size.step", "must be odd", id="even-kernel-inside-range"),
        pytest.param({"search_space": {"model.activation": ["relu", "swish"]}}, "search_space.model.activation.choices.1", "relu", id="unknown-choice"),
        pytest.param({"search_space": {"optim.momentum": {"type": "float", "low": 0.5, "high": 0.9}}}, "search_space.optim.momentum.low", "momentum applies to", id="momentum-without-condition"),
        pytest.param({"search_space": {"model.kernel_size": [3, 9]}}, "search_space.model.kernel_size", "never gives a valid, feasible trial", id="never-feasible-value"),
        pytest.param({"search_space": {"model.channels": [[8, 8, 8, 8, 8]]}}, "search_space", "no combination", id="nothing-feasible"),
        pytest.param({"search_space": {"model.aspp": [None], "model.aspp.channels": [8]}}, "search_space.model.aspp", "overlap", id="overlapping-paths"),
        pytest.param(
            {"search_space": {"optim.momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optim.optimizer": ["momentum"]}}, "optim.optimizer": ["adamw", "momentum"]}},
            "search_space.optim.momentum.when.optim.optimizer", "comes later", id="condition-on-later-key",
        ),
        pytest.param({"search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "sampler": "grid"}, "search_space.optim.lr", "grid needs", id="continuous-grid"),
        pytest.param({"search_space": {"optim.batch_size": [16, 32]}, "sampler": "grid", "n_trials": 3}, "n_trials", "grid has 2 points", id="grid-smaller-than-budget"),
        pytest.param({"warm_start": [{"optim.lr": 0.5}]}, "warm_start.0.optim.lr", "outside the search space", id="warm-start-outside"),
        pytest.param({"warm_start": [{"optim.batch_size": 32}]}, "warm_start.0.optim.batch_size", "not a key", id="warm-start-unknown-key"),
        pytest.param({"pruner": {"name": "hyperband", "max_resource": 50}}, "pruner.max_resource", "more than the 4 epochs", id="hyperband-beyond-epochs"),
        pytest.param({"pruner": {"name": "successive_halving", "min_resource": 4}}, "pruner.min_resource", "nothing to prune", id="asha-min-resource-too-late"),
    ],
)
def test_invalid_spaces_name_the_field(fields: dict[str, Any], field: str, fragment: str) -> None:
    errors = errors_of(**fields)
    assert field in errors, errors
    assert fragment in errors[field], errors[field]


@pytest.mark.parametrize("field", NON_HYPERPARAMETERS)
def test_no_field_that_is_not_an_mlflow_param_can_be_searched(field: str) -> None:
    errors = errors_of(search_space={field: [None, "x"]})
    assert list(errors) == [f"search_space.{field}"] and "cannot be searched" in errors[f"search_space.{field}"], errors
    assert field not in flatten_params(TrialSpec())


def test_searching_callback_url_is_a_422_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        study(search_space={"callback_url": ["https://a.example/hook"]})
    [error] = caught.value.errors(include_url=False)
    assert error["loc"] == ("search_space", "callback_url") and error["type"] == "invalid_study"
    assert "'callback_url' cannot be searched: it is not a hyperparameter" in error["msg"]


def test_a_conditional_parameter_is_valid_only_under_its_condition() -> None:
    spec = study(search_space={
        "optim.optimizer": ["adamw", "momentum", "nesterov"],
        "optim.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optim.optimizer": ["momentum", "nesterov"]}},
    })
    points = grid_points(spec.model_copy(update={"search_space": {**spec.search_space, "optim.momentum": CategoricalParam(choices=[0.5, 0.9], when={"optim.optimizer": ["momentum", "nesterov"]})}}))
    assert {"optim.optimizer": "adamw"} in points and {"optim.optimizer": "momentum", "optim.momentum": 0.9} in points
    assert len(points) == 5  # adamw alone, then 2 momenta for each of the two SGD flavours


def test_grid_points_enumerate_choices_ints_and_stepped_floats_in_order() -> None:
    spec = study(search_space={"optim.batch_size": {"type": "int", "low": 16, "high": 48, "step": 16}, "optim.lr": {"type": "float", "low": 0.01, "high": 0.03, "step": 0.01}}, sampler="grid")
    points = grid_points(spec)
    assert spec.budget == len(points) == 9
    assert points[0] == {"optim.batch_size": 16, "optim.lr": 0.01} and points[-1] == {"optim.batch_size": 48, "optim.lr": 0.03}


def test_apply_params_sets_dotted_paths_and_revalidates() -> None:
    spec = study()
    trial = apply_params(spec.base, {"optim.lr": 3e-3, "model.channels": [4, 8], "model.aspp": {"rates": [1]}}, name="x")
    assert trial.optim.lr == 3e-3 and trial.model.channels == [4, 8] and trial.model.aspp.rates == [1] and trial.name == "x"
    assert trial.optim.epochs == 4  # the rest comes from the base
    with pytest.raises(ValidationError):
        apply_params(spec.base, {"model.kernel_size": 4})


def test_suggest_samples_in_order_and_skips_unmet_conditions_with_optuna() -> None:
    spec = study(search_space={
        "optim.optimizer": ["adamw", "momentum"],
        "optim.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optim.optimizer": ["momentum"]}},
        "model.channels": [[8, 16], [16, 32]],
    })
    optuna_study = optuna.create_study(sampler=make_sampler(spec, seed=3), direction="maximize")
    seen = []
    for _ in range(12):
        trial = optuna_study.ask()
        params = suggest(trial, spec)
        seen.append(params)
        assert ("optim.momentum" in params) == (params["optim.optimizer"] == "momentum")
        assert params["model.channels"] in ([8, 16], [16, 32])  # decoded from Optuna's JSON strings
        assert decode_params(spec, trial.params) == params and encode_params(spec, params) == trial.params
        apply_params(spec.base, params)  # every sample is a valid trial
        optuna_study.tell(trial, 0.5)
    assert {p["optim.optimizer"] for p in seen} == {"adamw", "momentum"}


def test_each_step_seed_draws_differently_and_reproducibly() -> None:
    spec = study(sampler="random")

    def first_draw(seed: int) -> float:
        s = optuna.create_study(sampler=make_sampler(spec, seed))
        return suggest(s.ask(), spec)["optim.lr"]

    assert first_draw(1) == first_draw(1) != first_draw(2)


@pytest.mark.parametrize("name", ["none", "median", "successive_halving", "hyperband"])
def test_every_pruner_is_optunas(name: str) -> None:
    pruner = make_pruner(study(pruner=name))
    expected = {"none": "NopPruner", "median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner"}[name]
    assert type(pruner).__name__ == expected


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes", "gp"])
def test_every_sampler_samples_the_space(name: str) -> None:
    search_space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "optim.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16}}
    if name == "grid":
        search_space["optim.lr"] = [1e-3, 1e-2]
    spec = study(search_space=search_space, sampler={"name": name, "n_startup_trials": 2})
    s = optuna.create_study(sampler=make_sampler(spec, seed=0), direction="maximize")
    for i in range(4):
        trial = s.ask()
        params = suggest(trial, spec)
        s.tell(trial, params["optim.batch_size"] / 64 + i * 0.01)
    assert len(s.trials) == 4


def test_trial_labels_read_like_the_issue_asks() -> None:
    assert trial_label({"optim.lr": 0.003, "optim.batch_size": 32, "model.kernel_size": 3, "model.downsample": "maxpool", "model.activation": "relu"}) == "lr=3e-3 bs=32 k3 maxpool relu"
    assert trial_label({"model.channels": [16, 32], "optim.lr": 0.00035}) == "lr=3.5e-4 channels=[16,32]"
    assert trial_label({"optim.momentum": 0.9}) == "momentum=0.9"


def test_storage_kinds() -> None:
    assert storage_kind("/var/lib/convtune/studies.journal") == "journal"
    assert storage_kind("postgresql://u@db/convtune") == "postgresql"
    assert storage_kind("postgresql+psycopg://u@db/convtune") == "postgresql"


def test_the_spec_round_trips_through_json_as_the_storage_keeps_it() -> None:
    spec = study(search_space={"model.channels": [[8, 16], [16, 32]], "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}, warm_start=[{"model.channels": [8, 16]}])
    assert StudySpec.model_validate_json(spec.model_dump_json()) == spec
    assert json.loads(spec.model_dump_json())["search_space"]["model.channels"]["type"] == "categorical"
