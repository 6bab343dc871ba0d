"""The trial contract: every bound of every field, the conditional rules, and the JSON round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from models.spec.trial import (
    ACTIVATIONS,
    DOWNSAMPLING,
    NON_HYPERPARAMETERS,
    NORMS,
    OPTIMIZERS,
    SCHEDULES,
    AsppSpec,
    ConvNetSpec,
    DataSpec,
    OptimSpec,
    TrialSpec,
    flatten_params,
)

Loc = tuple[Any, ...]


def nest(path: Loc, value: Any) -> dict[str, Any]:
    """{'a': {'b': value}} for path ('a', 'b')."""
    for key in reversed(path):
        value = {key: value}
    return value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def error_locs(payload: dict[str, Any]) -> list[Loc]:
    with pytest.raises(ValidationError) as info:
        TrialSpec.model_validate(payload)
    return [e["loc"] for e in info.value.errors()]


MOMENTUM = {"optim": {"optimizer": "momentum"}}
ADAM = {"optim": {"optimizer": "adam"}}
NPZ = {"data": {"name": "npz", "path": "x.npz"}}
LONG = {"optim": {"epochs": 1000}}

# (field to set, value just inside, value just outside, loc of the error, other fields the case needs)
BOUNDS: list[tuple[Loc, Any, Any, Loc, dict[str, Any]]] = [
    # model.aspp
    (("model", "aspp", "rates"), [1], [0], ("model", "aspp", "rates", 0), {}),
    (("model", "aspp", "rates"), [64], [65], ("model", "aspp", "rates", 0), {}),
    (("model", "aspp", "rates"), [1], [], ("model", "aspp", "rates"), {}),
    (("model", "aspp", "rates"), [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7], ("model", "aspp", "rates"), {}),
    (("model", "aspp", "channels"), 1, 0, ("model", "aspp", "channels"), {}),
    (("model", "aspp", "channels"), 2048, 2049, ("model", "aspp", "channels"), {}),
    # model
    (("model", "channels"), [1], [0], ("model", "channels", 0), {}),
    (("model", "channels"), [2048], [2049], ("model", "channels", 0), {}),
    (("model", "channels"), [8], [], ("model", "channels"), {}),
    (("model", "channels"), [8] * 8, [8] * 9, ("model", "channels"), {}),
    (("model", "convs_per_stage"), 1, 0, ("model", "convs_per_stage"), {}),
    (("model", "convs_per_stage"), 6, 7, ("model", "convs_per_stage"), {}),
    (("model", "kernel_size"), 1, 0, ("model", "kernel_size"), {}),
    (("model", "kernel_size"), 27, 29, ("model", "kernel_size"), {}),
    (("model", "norm_groups"), 1, 0, ("model", "norm_groups"), {}),
    (("model", "norm_groups"), 512, 513, ("model", "norm_groups"), {}),
    (("model", "dropout"), 0.0, -0.01, ("model", "dropout"), {}),
    (("model", "dropout"), 0.9, 0.91, ("model", "dropout"), {}),
    (("model", "activation"), "relu", "swish", ("model", "activation"), {}),
    (("model", "norm"), "group", "layer", ("model", "norm"), {}),
    (("model", "downsample"), "dilation", "unpool", ("model", "downsample"), {}),
    (("model", "head"), "sigmoid", "softmax", ("model", "head"), {}),
    # optim
    (("optim", "optimizer"), "rmsprop", "lbfgs", ("optim", "optimizer"), {}),
    (("optim", "lr"), 1e-12, 0.0, ("optim", "lr"), {}),
    (("optim", "lr"), 10.0, 10.01, ("optim", "lr"), {}),
    (("optim", "weight_decay"), 0.0, -0.01, ("optim", "weight_decay"), {}),
    (("optim", "weight_decay"), 1.0, 1.01, ("optim", "weight_decay"), {}),
    (("optim", "momentum"), 0.0, -0.01, ("optim", "momentum"), MOMENTUM),
    (("optim", "momentum"), 0.999, 1.0, ("optim", "momentum"), MOMENTUM),
    (("optim", "betas"), [0.0, 0.5], [-0.01, 0.5], ("optim", "betas", 0), ADAM),
    (("optim", "betas"), [0.5, 0.999], [0.5, 1.0], ("optim", "betas", 1), ADAM),
    (("optim", "betas"), [0.9, 0.999], [0.9], ("optim", "betas", 1), ADAM),
    (("optim", "batch_size"), 1, 0, ("optim", "batch_size"), {}),
    (("optim", "batch_size"), 8192, 8193, ("optim", "batch_size"), {}),
    (("optim", "epochs"), 1, 0, ("optim", "epochs"), {}),
    (("optim", "epochs"), 1000, 1001, ("optim", "epochs"), {}),
    (("optim", "schedule"), "onecycle", "plateau", ("optim", "schedule"), {}),
    (("optim", "step_size"), 1, 0, ("optim", "step_size"), {}),
    (("optim", "step_size"), 1000, 1001, ("optim", "step_size"), {}),
    (("optim", "gamma"), 1e-9, 0.0, ("optim", "gamma"), {}),
    (("optim", "gamma"), 1.0, 1.01, ("optim", "gamma"), {}),
    (("optim", "warmup_epochs"), 0, -1, ("optim", "warmup_epochs"), LONG),
    (("optim", "warmup_epochs"), 100, 101, ("optim", "warmup_epochs"), LONG),
    (("optim", "grad_clip"), 1e-9, 0.0, ("optim", "grad_clip"), {}),
    (("optim", "grad_clip"), 1e6, 1.01e6, ("optim", "grad_clip"), {}),
    # data
    (("data", "name"), "folder", "imagenet", ("data", "name"), NPZ),
    (("data", "path"), "a" * 512, "a" * 513, ("data", "path"), NPZ),
    (("data", "val_fraction"), 0.05, 0.049, ("data", "val_fraction"), {}),
    (("data", "val_fraction"), 0.5, 0.51, ("data", "val_fraction"), {}),
    (("data", "seed"), 0, -1, ("data", "seed"), {}),
    (("data", "seed"), 2**31 - 1, 2**31, ("data", "seed"), {}),
    (("data", "num_classes"), 2, 1, ("data", "num_classes"), {}),
    (("data", "num_classes"), 8, 9, ("data", "num_classes"), {}),
    (("data", "num_samples"), 100, 99, ("data", "num_samples"), {}),
    (("data", "num_samples"), 50_000, 50_001, ("data", "num_samples"), {}),
    (("data", "image_size"), 8, 7, ("data", "image_size"), {}),
    (("data", "image_size"), 128, 129, ("data", "image_size"), {}),
    # trial
    (("seed",), 0, -1, ("seed",), {}),
    (("seed",), 2**31 - 1, 2**31, ("seed",), {}),
    (("time_limit_s",), 0.001, 0, ("time_limit_s",), {}),
    (("time_limit_s",), 7 * 24 * 3600, 7 * 24 * 3600 + 1, ("time_limit_s",), {}),
    (("queue",), "cpu", "tpu", ("queue",), {}),
    (("name",), "n" * 200, "n" * 201, ("name",), {}),
    (("tags",), {"k": "v" * 500}, {"k": "v" * 501}, ("tags", "k"), {}),
    (("tags",), {"k": "v"}, {"": "v"}, ("tags", "", "[key]"), {}),
    (("tags",), {"k" * 64: "v"}, {"k" * 65: "v"}, ("tags", "k" * 65, "[key]"), {}),
    (("tags",), {"a.b-c_D9": "v"}, {"a b": "v"}, ("tags", "a b", "[key]"), {}),
    (("tags",), {f"k{i}": "v" for i in range(20)}, {f"k{i}": "v" for i in range(21)}, ("tags",), {}),
]


@pytest.mark.parametrize(
    ("path", "inside", "outside", "loc", "base"), BOUNDS,
    ids=[f"{'.'.join(map(str, case[0]))}:{str(case[2])[:24]}" for case in BOUNDS],
)
def test_bound_just_inside_passes_just_outside_is_refused_at_its_field(
    path: Loc, inside: Any, outside: Any, loc: Loc, base: dict[str, Any],
) -> None:
    spec = TrialSpec.model_validate(merge(base, nest(path, inside)))
    value: Any = spec
    for key in path:
        value = getattr(value, key)
    assert value == (tuple(inside) if isinstance(value, tuple) else inside)
    assert loc in error_locs(merge(base, nest(path, outside)))


@pytest.mark.parametrize(
    ("path", "values"),
    [
        (("model", "activation"), ACTIVATIONS), (("model", "norm"), NORMS), (("model", "downsample"), DOWNSAMPLING),
        (("optim", "optimizer"), OPTIMIZERS), (("optim", "schedule"), SCHEDULES),
    ],
)
def test_every_listed_option_is_accepted(path: Loc, values: tuple[str, ...]) -> None:
    for value in values:
        TrialSpec.model_validate(nest(path, value))


@pytest.mark.parametrize("level", [(), ("model",), ("model", "aspp"), ("optim",), ("data",)])
def test_unknown_field_is_refused_at_every_level(level: Loc) -> None:
    payload = merge({"model": {"aspp": {}}}, nest(level, {"bogus": 1}))
    with pytest.raises(ValidationError) as info:
        TrialSpec.model_validate(payload)
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [((*level, "bogus"), "extra_forbidden")]


@pytest.mark.parametrize(
    ("payload", "loc", "words"),
    [
        ({"optim": {"optimizer": "adam", "momentum": 0.9}}, ("optim",), "momentum applies"),
        ({"optim": {"optimizer": "sgd", "betas": [0.9, 0.99]}}, ("optim",), "betas apply"),
        ({"optim": {"schedule": "onecycle", "warmup_epochs": 1}}, ("optim",), "onecycle"),
        ({"optim": {"epochs": 5, "warmup_epochs": 5}}, ("optim",), "fewer than epochs"),
        ({"model": {"kernel_size": 4}}, ("model", "kernel_size"), "odd"),
        ({"model": {"norm": "group", "norm_groups": 32, "channels": [32, 48]}}, ("model",), "[48]"),
        ({"model": {"norm": "group", "norm_groups": 4, "channels": [8], "aspp": {"channels": 6}}}, ("model",), "[6]"),
        ({"data": {"name": "npz", "path": "/etc/x.npz"}}, ("data", "path"), "inside the data root"),
        ({"data": {"name": "npz", "path": "../x.npz"}}, ("data", "path"), "inside the data root"),
        ({"data": {"name": "npz", "path": "a/../../x.npz"}}, ("data", "path"), "inside the data root"),
        ({"data": {"name": "npz", "path": ".."}}, ("data", "path"), "inside the data root"),
        ({"data": {"name": "npz", "path": "a\\b.npz"}}, ("data", "path"), "separators"),
        ({"data": {"name": "npz", "path": "a\x00.npz"}}, ("data", "path"), "NUL"),
        ({"data": {"name": "npz"}}, ("data",), "needs a 'path'"),
        ({"data": {"name": "folder"}}, ("data",), "needs a 'path'"),
        ({"data": {"name": "digits", "path": "x"}}, ("data",), "takes no 'path'"),
        ({"data": {"name": "shapes", "path": "x"}}, ("data",), "takes no 'path'"),
        ({"model": {"aspp": {"rates": [2, 2]}}}, ("model", "aspp", "rates"), "distinct"),
    ],
)
def test_conditional_rule_is_refused_with_its_reason(payload: dict[str, Any], loc: Loc, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrialSpec.model_validate(payload)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [loc]
    assert words in errors[0]["msg"]


@pytest.mark.parametrize(
    "payload",
    [
        {"optim": {"optimizer": "rmsprop", "momentum": 0.5}},
        {"optim": {"optimizer": "nesterov", "momentum": 0.9}},
        {"optim": {"optimizer": "adamw", "betas": [0.9, 0.95]}},
        {"optim": {"schedule": "onecycle", "warmup_epochs": 0}},
        {"optim": {"epochs": 5, "warmup_epochs": 4}},
        {"model": {"norm": "group", "norm_groups": 16, "channels": [32, 48], "aspp": {"channels": 16}}},
        {"model": {"norm": "batch", "norm_groups": 7, "channels": [32, 48]}},  # groups only matter for 'group'
        {"data": {"name": "folder", "path": "team/images"}},
    ],
)
def test_conditional_rule_accepts_what_it_allows(payload: dict[str, Any]) -> None:
    TrialSpec.model_validate(payload)


def test_data_path_is_normalised() -> None:
    assert DataSpec(name="npz", path="a/./b/../c.npz").path == "a/c.npz"


def test_spec_is_frozen() -> None:
    with pytest.raises(ValidationError):
        TrialSpec().seed = 3  # type: ignore[misc]


SPECS = [
    TrialSpec(),
    TrialSpec(
        model=ConvNetSpec(
            channels=[16, 32, 64], convs_per_stage=1, kernel_size=5, downsample="dilation",
            aspp=AsppSpec(rates=[1, 6], channels=32), activation="gelu", norm="group", norm_groups=8,
            dropout=0.25, head="sigmoid",
        ),
        optim=OptimSpec(optimizer="adam", lr=3e-3, betas=(0.8, 0.99), schedule="step", step_size=2, warmup_epochs=1, grad_clip=1.5),
        data=DataSpec(name="npz", path="team/train.npz", val_fraction=0.1, seed=7),
        seed=42, time_limit_s=60.5, queue="cpu", name="a run", tags={"team": "vision"},
    ),
    TrialSpec(optim=OptimSpec(optimizer="nesterov", momentum=0.8), data=DataSpec(name="shapes", num_classes=8, image_size=16)),
]


@pytest.mark.parametrize("spec", SPECS)
def test_json_dump_validates_back_to_an_equal_spec(spec: TrialSpec) -> None:
    wire = json.loads(json.dumps(spec.model_dump(mode="json")))  # what Celery carries
    assert TrialSpec.model_validate(wire) == spec


def _parse_param(text: str) -> Any:
    """Invert flatten_params' encoding of one value (JSON for lists, str() otherwise)."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@pytest.mark.parametrize("spec", SPECS)
def test_flatten_params_round_trips_every_hyperparameter(spec: TrialSpec) -> None:
    flat = flatten_params(spec)
    assert all(isinstance(k, str) and isinstance(v, str) and len(v) <= 6000 for k, v in flat.items())
    assert not any(k.split(".")[0] in NON_HYPERPARAMETERS for k in flat)
    nested: dict[str, Any] = {}
    for key, text in flat.items():
        nested = merge(nested, nest(tuple(key.split(".")), _parse_param(text)))
    rebuilt = TrialSpec.model_validate(nested)
    assert rebuilt == spec.model_copy(update={field: TrialSpec.model_fields[field].get_default(call_default_factory=True) for field in NON_HYPERPARAMETERS})


def test_the_non_hyperparameters_are_trial_spec_fields() -> None:
    assert set(NON_HYPERPARAMETERS) <= set(TrialSpec.model_fields)


def test_flatten_params_names_nested_fields_with_dots() -> None:
    flat = flatten_params(SPECS[1])
    assert flat["optim.lr"] == "0.003"
    assert flat["model.channels"] == "[16, 32, 64]"
    assert flat["model.aspp.rates"] == "[1, 6]"
    assert flat["optim.betas"] == "[0.8, 0.99]"
    assert flatten_params(SPECS[0])["model.aspp"] == "None"
