"""The torch-free plan against the real network: every layer's shape, every parameter, every FLOP."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.data.sets import describe
from models.nets.convnet import build_model
from models.spec.plan import InfeasibleArchitecture, InputInfo, builtin_input, plan_network
from models.spec.trial import DOWNSAMPLING, NORMS, AsppSpec, ConvNetSpec, DataSpec

DIGITS = InputInfo(1, 8, 8, 10)
SHAPES = InputInfo(3, 32, 32, 4)
ODD = InputInfo(1, 9, 7, 2)  # odd and unequal sides: pool floors, stride rounds up
WIDE = InputInfo(3, 12, 20, 3)

# (input, architecture) pairs that are feasible under every downsample mode and norm.
VARIANTS: list[tuple[str, InputInfo, dict[str, Any]]] = [
    ("digits-2x1-k3", DIGITS, dict(channels=[4, 8], kernel_size=3, convs_per_stage=1)),
    ("digits-2x2-k3-aspp", DIGITS, dict(channels=[4, 8], kernel_size=3, aspp=AsppSpec(rates=[1], channels=6))),
    ("digits-1x1-k5", DIGITS, dict(channels=[8], kernel_size=5, convs_per_stage=1, head="sigmoid")),
    ("digits-4x1-k1", DIGITS, dict(channels=[2, 4, 4, 6], kernel_size=1, convs_per_stage=1)),
    ("shapes-3x2-k3-aspp", SHAPES, dict(channels=[4, 8, 8], kernel_size=3, aspp=AsppSpec(rates=[1, 2, 3], channels=8))),
    ("shapes-3x1-k5", SHAPES, dict(channels=[4, 6, 8], kernel_size=5, convs_per_stage=1, dropout=0.5)),
    ("odd-3x2-k1", ODD, dict(channels=[2, 4, 4], kernel_size=1)),
    ("wide-2x3-k3-aspp", WIDE, dict(channels=[4, 6], kernel_size=3, convs_per_stage=3, aspp=AsppSpec(rates=[2], channels=4))),
]
CASES = [
    pytest.param(inp, ConvNetSpec(**arch, downsample=down, norm=norm, norm_groups=2), id=f"{name}-{down}-{norm}")
    for name, inp, arch in VARIANTS for down in DOWNSAMPLING for norm in NORMS
]


def _as_chw(shape: torch.Size) -> tuple[int, ...]:
    """(C, H, W) of one sample's output; the head's (num_classes,) reads as (num_classes, 1, 1)."""
    return tuple(shape[1:]) + (1,) * (4 - len(shape))


@pytest.mark.parametrize(("inp", "spec"), CASES)
def test_plan_matches_torch_layer_by_layer(inp: InputInfo, spec: ConvNetSpec) -> None:
    plan = plan_network(spec, inp)
    torch.manual_seed(0)
    net = build_model(spec, inp).eval()  # eval: batch norm on a 1x1 map of one sample is fine then
    outputs: dict[str, tuple[int, ...]] = {}
    for layer in plan.layers:
        module = net.get_submodule(layer.name)
        module.register_forward_hook(lambda m, args, out, name=layer.name: outputs.__setitem__(name, _as_chw(out.shape)))
    with FlopCounterMode(display=False) as counter:
        logits = net(torch.randn(1, inp.channels, inp.height, inp.width))

    assert logits.shape == (1, inp.num_classes)
    assert outputs == {layer.name: layer.out_shape for layer in plan.layers}
    for layer in plan.layers:
        assert layer.params == sum(p.numel() for p in net.get_submodule(layer.name).parameters()), layer.name
        assert layer.flops == sum(counter.get_flop_counts().get(f"ConvNet.{layer.name}", {}).values()), layer.name
    assert plan.params == sum(p.numel() for p in net.parameters())
    assert plan.flops == counter.get_total_flops()
    assert [layer.in_shape for layer in plan.layers[1:]] == [layer.out_shape for layer in plan.layers[:-1]]


def test_plan_summary_rows_are_json_ready() -> None:
    plan = plan_network(ConvNetSpec(channels=[4, 8], aspp=AsppSpec(rates=[1], channels=4)), DIGITS)
    rows = plan.summary()
    assert [row["layer"] for row in rows] == [
        "features.stage1.conv1", "features.stage1.conv2", "features.stage2.pool", "features.stage2.conv1",
        "features.stage2.conv2", "features.aspp", "pool", "head",
    ]
    assert rows[0] == {
        "layer": "features.stage1.conv1", "kind": "conv", "in_shape": [1, 8, 8], "out_shape": [4, 8, 8],
        "params": 4 * 9 + 2 * 4, "flops": 2 * 4 * 8 * 8 * 9,
    }
    assert rows[-1]["out_shape"] == [10, 1, 1]
    assert sum(row["params"] for row in rows) == plan.params


@pytest.mark.parametrize(
    ("spec", "inp", "layer", "field", "words"),
    [
        pytest.param(
            ConvNetSpec(channels=[4] * 5, kernel_size=1, downsample="maxpool"), DIGITS,
            "features.stage5.pool", "model.channels", "a 2x2 max pool would shrink the 1x1 map below 1x1; use fewer stages",
            id="too-many-pool-stages",
        ),
        pytest.param(
            ConvNetSpec(channels=[4, 4, 4], kernel_size=3, downsample="avgpool"), DIGITS,
            "features.stage3.conv1", "model.kernel_size", "3x3 kernel is larger than its 2x2 input", id="pooled-below-kernel",
        ),
        pytest.param(
            ConvNetSpec(channels=[4], kernel_size=27), DIGITS,
            "features.stage1.conv1", "model.kernel_size", "27x27 kernel is larger than its 8x8 input", id="kernel-27-on-8x8",
        ),
        pytest.param(
            # Stage 3 dilates by 4: a 3x3 then spans 9x9 on the 8x8 map (stage 4 would dilate by 8).
            ConvNetSpec(channels=[4, 4, 4, 4], kernel_size=3, downsample="dilation"), DIGITS,
            "features.stage3.conv1", "model.downsample", "dilated by 4 spans 9x9", id="dilation-outgrows-map",
        ),
        pytest.param(
            ConvNetSpec(channels=[4, 4], aspp=AsppSpec(rates=[1, 8])), DIGITS,
            "features.aspp", "model.aspp.rates", "rate 8 spans 17x17, larger than its 4x4 input; use rates up to 1",
            id="aspp-rate-8-on-4x4",
        ),
        pytest.param(
            ConvNetSpec(channels=[4, 4, 4], kernel_size=1, aspp=AsppSpec(rates=[1])), DIGITS,
            "features.aspp", "model.aspp.rates", "needs at least a 3x3 map", id="aspp-on-2x2",
        ),
        pytest.param(
            # Stage 3's strided conv1 takes the 5x4 map to 3x2, too small for conv2's 3x3.
            ConvNetSpec(channels=[4, 4, 4], kernel_size=3, downsample="stride"), ODD,
            "features.stage3.conv2", "model.kernel_size", "larger than its 3x2 input", id="stride-on-unequal-sides",
        ),
    ],
)
def test_infeasible_spec_names_layer_field_and_sizes(
    spec: ConvNetSpec, inp: InputInfo, layer: str, field: str, words: str,
) -> None:
    with pytest.raises(InfeasibleArchitecture) as info:
        plan_network(spec, inp)
    assert (info.value.layer, info.value.field) == (layer, field)
    assert str(info.value).startswith(f"{layer}: ")
    assert words in str(info.value)
    with pytest.raises(InfeasibleArchitecture):
        build_model(spec, inp)  # the builder checks the plan before building anything


def test_stride_never_shrinks_below_one_pixel() -> None:
    plan = plan_network(ConvNetSpec(channels=[2] * 8, kernel_size=1, downsample="stride"), DIGITS)
    assert [layer.out_shape[1:] for layer in plan.layers if layer.name.endswith("conv1")] == [
        (8, 8), (4, 4), (2, 2), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1),
    ]


@pytest.mark.parametrize(
    "data",
    [DataSpec(name="digits"), DataSpec(name="shapes"), DataSpec(name="shapes", image_size=8, num_classes=8), DataSpec(name="npz", path="a.npz")],
    ids=["digits", "shapes", "shapes-8px-8-classes", "npz"],
)
def test_the_contract_knows_the_built_in_inputs_as_the_data_readers_do(data: DataSpec) -> None:
    # The study spec checks feasibility with builtin_input (no numpy in the contract); the workers train on describe's.
    assert builtin_input(data) == describe(data, None)
