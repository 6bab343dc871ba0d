"""The study spec: search-space paths, ranges and feasibility are checked at validation, naming the field."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from models.spec.choices import PRUNERS, SAMPLERS
from models.spec.objectives import Candidate, ConstraintSpec, ObjectiveSpec, choose, knee, pareto_front
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
    assert spec.primary.metric == "val_accuracy" and spec.primary.resolved_direction == "maximize" and not spec.multi_objective
    assert StudySpec.model_validate({**spec.model_dump(), "objective": {"metric": "val_loss"}}).primary.resolved_direction == "minimize"


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


OPTUNA_PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner"}


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_is_optunas(name: str) -> None:
    assert name in OPTUNA_PRUNERS, f"say here which Optuna pruner {name!r} builds"
    assert type(make_pruner(study(pruner=name))).__name__ == OPTUNA_PRUNERS[name]


@pytest.mark.parametrize("name", SAMPLERS)
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


# --- objectives, budgets and the rule that chooses a trial (issue 13) ----------------------------------

SHAPES = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"epochs": 1}, "data": {"name": "shapes", "image_size": 16}}
CHANNELS = {"model.channels": [[4, 8], [8, 16], [32, 64]]}  # 16x16x3 shapes: 92,224 to 2,802,176 FLOPs per sample
TWO_GOALS = [{"metric": "val_accuracy"}, {"metric": "flops_per_sample"}]


def budgeted(**fields: Any) -> StudySpec:
    return StudySpec.model_validate({"base": SHAPES, "search_space": CHANNELS, **fields})


def budget_errors(**fields: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        budgeted(**fields)
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in caught.value.errors(include_url=False)}


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        pytest.param({"objective": {"metric": "val_loss"}, "objectives": TWO_GOALS}, "objectives", "not both", id="objective-and-objectives"),
        pytest.param({"objectives": [{"metric": "val_accuracy"}, {"metric": "val_accuracy", "direction": "minimize"}]}, "objectives.1.metric", "already an objective", id="same-objective-twice"),
        pytest.param({"objectives": TWO_GOALS, "pruner": "median"}, "pruner", "pruners", id="pruning-several-objectives"),
        pytest.param({"objective": {"metric": "latency_ms"}, "pruner": "successive_halving"}, "pruner", "not logged every epoch", id="pruning-a-latency"),
        pytest.param({"objectives": TWO_GOALS, "target": 0.9}, "target", "no single value", id="target-with-several-objectives"),
        pytest.param({"objectives": TWO_GOALS, "sampler": "cmaes"}, "sampler.name", "CMA-ES optimises one objective", id="cmaes-with-several-objectives"),
        pytest.param({"register_as": {"name": "m", "rule": "knee"}}, "register_as.rule", "two objectives", id="knee-of-one-objective"),
        pytest.param({"objectives": [{"metric": "val_loss_typo"}, {"metric": "params"}]}, "objectives.0.metric", "val_accuracy", id="unknown-measure"),
        pytest.param({"constraints": [{"metric": "params"}]}, "constraints.0", "needs a bound", id="constraint-without-bound"),
        pytest.param({"constraints": [{"metric": "params", "min": 10, "max": 5}]}, "constraints.0", "above max", id="constraint-min-above-max"),
        pytest.param({"constraints": [{"metric": "val_accuracy", "min": 1.5}]}, "constraints.0", "can never be met", id="accuracy-above-one"),
        pytest.param({"constraints": [{"metric": "params", "max": 1000}, {"metric": "params", "max": 1000}]}, "constraints.1", "repeats a bound", id="same-bound-twice"),
        pytest.param({"constraints": [{"metric": "flops_per_sample", "max": 50_000}]}, "constraints.0", "no corner of the search space meets flops_per_sample <= 50,000", id="flops-budget-no-corner-meets"),
        pytest.param({"constraints": [{"metric": "params", "min": 10_000_000}]}, "constraints.0", "no corner", id="params-floor-no-corner-meets"),
    ],
)
def test_invalid_objectives_and_budgets_name_the_field(fields: dict[str, Any], field: str, fragment: str) -> None:
    errors = budget_errors(**fields)
    assert field in errors, errors
    assert fragment in errors[field], errors[field]


def test_a_corner_infeasible_budget_says_what_the_corners_reach() -> None:
    message = budget_errors(constraints=[{"metric": "flops_per_sample", "max": 50_000}])["constraints.0"]
    assert "ranges from 92,224 to 2,802,176" in message, message
    assert budgeted(constraints=[{"metric": "flops_per_sample", "max": 100_000}]).constraints[0].max == 100_000  # one corner fits: accepted


def test_several_objectives_turn_the_default_pruner_off_and_keep_the_single_form_working() -> None:
    multi = budgeted(objectives=TWO_GOALS)
    assert multi.multi_objective and multi.pruner.name == "none" and multi.directions == ["maximize", "minimize"]
    assert budgeted(objective={"metric": "latency_ms"}).pruner.name == "none" and budgeted().pruner.name == "successive_halving"
    assert budgeted(objectives=TWO_GOALS).measures_latency is False
    assert budgeted(objectives=[{"metric": "val_accuracy"}, {"metric": "latency_ms"}]).measures_latency is True
    assert budgeted(constraints=[{"metric": "latency_ms_batch", "max": 5}]).measures_latency is True
    assert budgeted(base={**SHAPES, "latency": {"batch": 8}}).measures_latency is True  # the explicit opt-in


def test_register_as_keeps_its_plain_form_and_states_its_rule() -> None:
    assert budgeted(register_as="digits-net").register_as.name == "digits-net"
    assert budgeted(register_as="digits-net").selection_rule == "best val_accuracy"
    assert budgeted(objectives=TWO_GOALS).selection_rule == "knee of the front"
    rule = budgeted(objectives=TWO_GOALS, register_as={"name": "m", "metric": "val_accuracy", "where": [{"metric": "flops_per_sample", "max": 1e6}]})
    assert rule.selection_rule == "best val_accuracy where flops_per_sample <= 1,000,000"
    two_epochs = {**SHAPES, "optim": {"epochs": 2}}  # a 1-epoch dump's pruner.min_resource=1 is refused outside the storage
    for spec in (rule, budgeted(base=two_epochs, register_as="x", constraints=[{"metric": "params", "max": 5e4}])):
        assert StudySpec.model_validate_json(spec.model_dump_json()) == spec  # stored and re-read by every worker step
        assert StudySpec.model_validate(spec.model_dump(mode="json")) == spec  # /extend re-validates the dump


def test_constraint_values_are_relative_and_unknown_counts_as_met() -> None:
    budget = ConstraintSpec(metric="flops_per_sample", max=2e6)
    assert budget.violations(3e6) == {"flops_per_sample<=2e+06": pytest.approx(0.5)}
    assert budget.violations(1e6)["flops_per_sample<=2e+06"] < 0 and budget.violations(None)["flops_per_sample<=2e+06"] == 0
    assert budget.broken_by(3_145_728) == "flops_per_sample 3,145,728 > max 2,000,000" and budget.broken_by(2e6) is None
    assert ConstraintSpec(metric="val_accuracy", min=0.9).broken_by(0.85) == "val_accuracy 0.85 < min 0.9"


GOALS = [ObjectiveSpec(metric="val_accuracy"), ObjectiveSpec(metric="flops_per_sample")]


def points(*rows: tuple[float, float], feasible: tuple[int, ...] = ()) -> list[Candidate]:
    return [Candidate(i, (acc, flops), {"val_accuracy": acc, "flops_per_sample": flops}, i not in feasible) for i, (acc, flops) in enumerate(rows)]


def test_the_front_keeps_the_feasible_non_dominated_trials() -> None:
    trials = points((0.90, 1e5), (0.95, 4e5), (0.97, 2e6), (0.93, 8e5), (0.99, 1e7), feasible=(4,))  # #3 is dominated by #1; #4 broke a budget
    assert [c.number for c in pareto_front(trials, ["maximize", "minimize"])] == [2, 1, 0]


def test_the_knee_is_the_bend_of_a_two_objective_front() -> None:
    front = pareto_front(points((0.50, 1e5), (0.94, 2e5), (0.96, 2e6), (0.97, 4e6)), ["maximize", "minimize"])
    assert knee(front, ["maximize", "minimize"]).number == 1  # most of the accuracy for a twentieth of the FLOPs


def test_choose_best_within_where_or_the_knee() -> None:
    trials = points((0.90, 1e5), (0.95, 4e5), (0.97, 2e6))
    assert choose(trials, GOALS).number == 2  # best val_accuracy
    assert choose(trials, GOALS, where=[ConstraintSpec(metric="flops_per_sample", max=1e6)]).number == 1
    assert choose(trials, GOALS, metric="flops_per_sample").number == 0
    assert choose(trials, GOALS, rule="knee").number == 1
    assert choose(trials, GOALS, where=[ConstraintSpec(metric="flops_per_sample", max=10)]) is None


def test_budgets_reach_optunas_samplers_as_constraints() -> None:
    """What a study step tells Optuna: TPE ranks an over-budget trial as infeasible; the best and the front skip it."""
    spec = budgeted(objectives=TWO_GOALS, constraints=[{"metric": "flops_per_sample", "max": 1e6}], sampler="nsga2")
    s = optuna.create_study(directions=spec.directions, sampler=make_sampler(spec, 0))
    for acc, flops in ((0.9, 2e5), (0.99, 3e6), (0.95, 8e5)):
        trial = s.ask()
        for key, value in spec.constraints[0].violations(flops).items():
            trial.set_constraint(key, value)
        s.tell(trial, [acc, flops])
    assert [t.number for t in s.best_trials] == [0, 2] and s.trials[1].constraints == {"flops_per_sample<=1e+06": pytest.approx(2.0)}
