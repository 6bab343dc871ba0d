"""The conv net a :class:`~models.spec.trial.ConvNetSpec` describes, as torch modules.

The architecture, its layer names and its arithmetic are documented in :mod:`models.spec.plan`, which
sizes it without torch; :func:`build_model` plans first, so an infeasible spec raises
:class:`~models.spec.plan.InfeasibleArchitecture` before any module is built.

Layer options are name -> factory tables (:data:`ACTIVATIONS`, :data:`NORMS`, :data:`DOWNSAMPLING`) keyed
by the names of :mod:`models.spec.choices`, one entry per name the spec allows (``tests/test_registries.py``
checks they agree); a name missing from a table fails with the list of known names, never a default.

The output layer ``head`` is linear, without activation or norm: :meth:`ConvNet.forward` returns
logits whatever ``head`` says, because the losses want logits (cross-entropy takes them, and
``BCEWithLogitsLoss`` is the stable form of a sigmoid output). ``head="sigmoid"`` sets
:attr:`ConvNet.output_activation` to ``nn.Sigmoid`` and :meth:`ConvNet.predict` applies it; the
training code picks the loss that matches.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import torch
from torch import nn

from models.spec.choices import lookup
from models.spec.plan import InputInfo, conv_has_bias, plan_network, stage_geometry
from models.spec.trial import ConvNetSpec

__all__ = ["ACTIVATIONS", "DOWNSAMPLING", "NORMS", "OUTPUT_ACTIVATIONS", "ASPP", "ConvBlock", "ConvNet", "Stage", "build_model", "lookup"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU,
    "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
# Each builds a norm for (channels, groups); only group norm uses the groups.
NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "batch": lambda channels, groups: nn.BatchNorm2d(channels),
    "group": lambda channels, groups: nn.GroupNorm(groups, channels),
    "none": lambda channels, groups: nn.Identity(),
}
# Each builds the pool before a stage that downsamples; None: no pool layer, the stage's convs stride or
# dilate instead (models.spec.plan.stage_geometry decides which stages, for the plan and the modules alike).
DOWNSAMPLING: dict[str, Callable[[], nn.Module] | None] = {
    "stride": None,
    "maxpool": lambda: nn.MaxPool2d(2, 2),
    "avgpool": lambda: nn.AvgPool2d(2, 2),
    "dilation": None,
}
OUTPUT_ACTIVATIONS: dict[str, type[nn.Module]] = {"logits": nn.Identity, "sigmoid": nn.Sigmoid}


class ConvBlock(nn.Module):
    """Conv (k x k, 'same' padding for stride 1) -> norm -> activation."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, norm: str, activation: str,
        norm_groups: int = 1, stride: int = 1, dilation: int = 1,
    ):
        super().__init__()
        assert kernel_size % 2 == 1, f"kernel_size must be odd to keep the map centred, got {kernel_size}"
        make_norm, make_act = lookup(NORMS, norm, "norm"), lookup(ACTIVATIONS, activation, "activation")
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=dilation * (kernel_size // 2),
            dilation=dilation, bias=conv_has_bias(norm),
        )
        self.norm = make_norm(out_channels, norm_groups)
        self.act = make_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))  # (N, C_out, H', W')


class Stage(nn.Sequential):
    """One resolution of the network: an optional pool, then ``convs_per_stage`` ConvBlocks."""

    def __init__(self, model: ConvNetSpec, index: int, in_channels: int):
        geometry = stage_geometry(model.downsample, index)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        make_pool = lookup(DOWNSAMPLING, model.downsample, "downsample")
        if geometry.pool:
            assert make_pool is not None, f"the plan pools before stage {index} under {model.downsample!r}, which builds no pool"
            layers["pool"] = make_pool()
        width = model.channels[index - 1]
        for j in range(1, model.convs_per_stage + 1):
            layers[f"conv{j}"] = ConvBlock(
                in_channels if j == 1 else width, width, model.kernel_size,
                norm=model.norm, activation=model.activation, norm_groups=model.norm_groups,
                stride=geometry.stride if j == 1 else 1, dilation=geometry.dilation,
            )
        super().__init__(layers)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 and a dilated 3x3 per rate in parallel, concatenated, projected."""

    def __init__(self, model: ConvNetSpec, in_channels: int):
        super().__init__()
        assert model.aspp is not None, "ASPP needs a spec with model.aspp set"
        out = model.aspp.channels
        block = partial(ConvBlock, norm=model.norm, activation=model.activation, norm_groups=model.norm_groups)
        self.branches = nn.ModuleList(
            [block(in_channels, out, 1)] + [block(in_channels, out, 3, dilation=rate) for rate in model.aspp.rates]
        )
        self.project = block(out * len(self.branches), out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [branch(x) for branch in self.branches]  # each (N, A, H, W): padding = rate keeps H, W
        return self.project(torch.cat(parts, dim=1))  # (N, A * branches, H, W) -> (N, A, H, W)


class ConvNet(nn.Module):
    """Stages, optional ASPP, global average pool, dropout and a linear head that returns logits."""

    def __init__(self, model: ConvNetSpec, inp: InputInfo):
        super().__init__()
        features: OrderedDict[str, nn.Module] = OrderedDict()
        channels = inp.channels
        for i in range(1, len(model.channels) + 1):
            features[f"stage{i}"] = Stage(model, i, channels)
            channels = model.channels[i - 1]
        if model.aspp is not None:
            features["aspp"] = ASPP(model, channels)
            channels = model.aspp.channels
        self.in_channels = inp.channels
        self.features = nn.Sequential(features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(model.dropout)
        self.head = nn.Linear(channels, inp.num_classes)
        self.output_activation = lookup(OUTPUT_ACTIVATIONS, model.head, "head")()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4 and x.shape[1] == self.in_channels, (
            f"expected images (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
        )
        x = self.features(x)  # (N, C, H', W')
        x = self.pool(x).flatten(1)  # (N, C)
        return self.head(self.dropout(x))  # (N, num_classes) logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output with the head's activation applied: logits, or sigmoid probabilities."""
        return self.output_activation(self(x))  # (N, num_classes)


def build_model(model: ConvNetSpec, inp: InputInfo) -> ConvNet:
    """Build the network for ``model`` on ``inp``; raises InfeasibleArchitecture (from the plan) before building."""
    plan_network(model, inp)
    return ConvNet(model, inp)
