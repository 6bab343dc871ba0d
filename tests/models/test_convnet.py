"""Every option the spec offers builds a network that runs forward and backward; unknown names fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from torch import nn

from models.nets.convnet import OUTPUT_ACTIVATIONS, ConvBlock, build_model, lookup
from models.spec.choices import ACTIVATIONS, DOWNSAMPLING, NORMS
from models.spec.plan import InputInfo, stage_geometry
from models.spec.trial import AsppSpec, ConvNetSpec

HEADS: tuple[str, ...] = get_args(ConvNetSpec.model_fields["head"].annotation)
INPUTS = {"digits": InputInfo(1, 8, 8, 10), "shapes": InputInfo(3, 16, 16, 5)}
BASE: dict[str, Any] = dict(channels=[4, 8], convs_per_stage=2, kernel_size=3, norm_groups=2, dropout=0.1)
OPTIONS = (
    [("activation", a) for a in ACTIVATIONS] + [("norm", n) for n in NORMS]
    + [("downsample", d) for d in DOWNSAMPLING] + [("head", h) for h in HEADS]
    + [("aspp", None), ("aspp", AsppSpec(rates=[1], channels=6))]
)


def test_the_head_table_covers_exactly_the_heads_the_spec_allows() -> None:
    # Activations, norms and downsampling: tests/test_registries.py, against models.spec.choices.
    assert set(OUTPUT_ACTIVATIONS) == set(HEADS)


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize(("field", "value"), OPTIONS, ids=[f"{f}={getattr(v, 'rates', v)}" for f, v in OPTIONS])
def test_every_option_trains_one_step(field: str, value: Any, data: str) -> None:
    inp = INPUTS[data]
    torch.manual_seed(0)
    net = build_model(ConvNetSpec(**{**BASE, field: value}), inp).train()
    x = torch.randn(4, inp.channels, inp.height, inp.width)

    logits = net(x)
    assert logits.shape == (4, inp.num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.arange(4) % inp.num_classes).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} got no finite gradient"


def test_head_is_a_bare_linear_layer_and_sigmoid_applies_only_in_predict() -> None:
    inp = INPUTS["shapes"]
    torch.manual_seed(0)
    net = build_model(ConvNetSpec(**BASE, head="sigmoid"), inp).eval()
    assert isinstance(net.head, nn.Linear)
    x = torch.randn(8, inp.channels, inp.height, inp.width) * 5
    with torch.no_grad():
        net.head.bias.fill_(3.0)  # push logits out of (0, 1): forward must not squash them
        logits, probs = net(x), net.predict(x)
    assert (logits > 1).any()
    assert torch.equal(probs, torch.sigmoid(logits))
    assert ((probs > 0) & (probs < 1)).all()

    plain = build_model(ConvNetSpec(**BASE), inp).eval()
    with torch.no_grad():
        assert torch.equal(plain.predict(x), plain(x))


def test_module_names_follow_the_plan() -> None:
    net = build_model(ConvNetSpec(**BASE, downsample="avgpool", aspp=AsppSpec(rates=[1], channels=4)), INPUTS["digits"])
    names = dict(net.named_modules())
    assert isinstance(names["features.stage2.pool"], nn.AvgPool2d)
    assert isinstance(names["features.stage1.conv2.conv"], nn.Conv2d)
    assert names["features.stage1.conv1.conv"].bias is None  # batch norm follows it
    assert isinstance(names["features.aspp.branches.1.conv"], nn.Conv2d) and names["features.aspp.branches.1.conv"].dilation == (1, 1)
    assert isinstance(names["dropout"], nn.Dropout) and names["dropout"].p == BASE["dropout"]
    assert "features.stage1.pool" not in names


def test_conv_keeps_its_bias_without_norm() -> None:
    block = ConvBlock(3, 4, 3, norm="none", activation="relu")
    assert block.conv.bias is not None and isinstance(block.norm, nn.Identity)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(norm="layer", activation="relu"), "unknown norm 'layer'; known: batch, group, none"),
        (dict(norm="batch", activation="swish"), "unknown activation 'swish'; known: elu, gelu, leaky_relu, relu, sigmoid, silu, tanh"),
    ],
)
def test_unknown_layer_name_fails_listing_the_known_ones(kwargs: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError) as info:
        ConvBlock(3, 4, 3, **kwargs)
    assert str(info.value) == words


def test_unknown_names_outside_the_spec_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown downsample 'unpool'; known: avgpool, dilation, maxpool, stride"):
        stage_geometry("unpool", 2)
    with pytest.raises(ValueError, match="unknown head 'softmax'; known: logits, sigmoid"):
        lookup(OUTPUT_ACTIVATIONS, "softmax", "head")
    # A spec built without validation (model_construct) still cannot smuggle in an unknown name.
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build_model(ConvNetSpec.model_construct(**{**ConvNetSpec().model_dump(), "activation": "swish"}), INPUTS["digits"])


def test_wrong_input_channels_fail_with_the_expected_shape() -> None:
    net = build_model(ConvNetSpec(**BASE), INPUTS["digits"])
    with pytest.raises(AssertionError, match=r"expected images \(N, 1, H, W\), got \(2, 3, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8))


def test_torch_free_modules_do_not_import_torch_sklearn_or_pil() -> None:
    code = (
        "import models, models.spec.trial, models.spec.plan, models.data.sets, models.messages, sys; "
        "heavy = sorted({'torch', 'sklearn', 'PIL'} & set(sys.modules)); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
