"""Size a conv net without building it: feature-map shape, parameters and FLOPs of every layer.

The API uses this to refuse an infeasible spec (a map that shrinks below 1x1, a kernel larger than
its input) with a 422 naming the layer, before anything is queued; workers tag each run with the
totals. ``models.nets.convnet`` builds exactly the architecture described here, with the same layer names
(its ``named_modules()`` paths), and ``tests/models/test_shapes.py`` checks every number against real
torch modules.

The architecture, for S = len(model.channels) stages:

- ``features.stage{i}`` for i = 1..S, each ``convs_per_stage`` ConvBlocks ``features.stage{i}.conv{j}``
  (a k x k conv with padding dilation * (k // 2), then norm, then activation). Stage 1 sees the input
  at full resolution; for i >= 2 ``downsample`` decides (see :func:`stage_geometry`): ``stride`` gives
  conv1 stride 2, ``maxpool``/``avgpool`` puts a 2x2/2 pool ``features.stage{i}.pool`` before conv1,
  ``dilation`` keeps the size and dilates every conv of the stage by 2**(i-1).
- ``features.aspp`` (optional): a 1x1 branch and one 3x3 branch of dilation r per rate, concatenated,
  then a 1x1 projection; every part a ConvBlock of ``aspp.channels``. Size kept.
- ``pool`` (global average to 1x1), ``dropout`` (no parameters, not in the plan), ``head`` (linear to
  the classes: logits).

FLOPs are 2 x the multiply-accumulates of the convolutions and the linear head only, per sample: what
``torch.utils.flop_counter.FlopCounterMode`` counts for ``aten.convolution`` and ``aten.addmm``.
Norms, activations, pooling and bias adds count nothing.

This module must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.spec.choices import lookup
from models.spec.errors import ConvtuneError
from models.spec.trial import ConvNetSpec, DataSpec

__all__ = [
    "DOWNSAMPLING_GEOMETRY", "NORM_PARAMS", "InfeasibleArchitecture", "InputInfo", "LayerPlan", "NetworkPlan", "StageGeometry",
    "builtin_input", "conv_has_bias", "plan_network", "size_problem", "stage_geometry",
]

Shape = tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class InputInfo:
    """What the network needs to know about its input: image size and number of classes."""

    channels: int
    height: int
    width: int
    num_classes: int


def builtin_input(data: DataSpec) -> InputInfo | None:
    """The input of a built-in data set, known from the spec alone; None for file data, which must be read.

    ``models.data.sets.describe`` sizes file data (it needs the data root and numpy); for the
    built-ins it must agree with this.
    """
    if data.name == "digits":
        return InputInfo(channels=1, height=8, width=8, num_classes=10)  # scikit-learn's 8x8 digits
    if data.name == "shapes":
        return InputInfo(channels=3, height=data.image_size, width=data.image_size, num_classes=data.num_classes)
    return None


class InfeasibleArchitecture(ConvtuneError, ValueError):
    """The architecture cannot run on its input; ``layer`` is where, ``field`` the spec field to change."""

    def __init__(self, layer: str, field: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class LayerPlan:
    """One layer's name (its torch module path), kind, shapes (C, H, W), parameters and FLOPs per sample."""

    name: str
    kind: str
    in_shape: Shape
    out_shape: Shape
    params: int
    flops: int


@dataclass(frozen=True)
class NetworkPlan:
    """Every layer of a network in forward order, with the totals."""

    layers: tuple[LayerPlan, ...]
    params: int
    flops: int

    def summary(self) -> list[dict[str, Any]]:
        """One JSON-ready row per layer, for a model summary table."""
        return [
            {
                "layer": layer.name, "kind": layer.kind, "in_shape": list(layer.in_shape),
                "out_shape": list(layer.out_shape), "params": layer.params, "flops": layer.flops,
            }
            for layer in self.layers
        ]


@dataclass(frozen=True)
class StageGeometry:
    """How one stage changes resolution: a 2x2/2 pool before it, its first conv's stride, its dilation."""

    pool: bool = False
    stride: int = 1
    dilation: int = 1


# Keyed by the names of models.spec.choices (DOWNSAMPLING, NORMS), as the modules' tables in
# models.nets.convnet are; tests/test_registries.py fails when a name is missing from either.
DOWNSAMPLING_GEOMETRY: dict[str, Callable[[int], StageGeometry]] = {
    "stride": lambda stage: StageGeometry(stride=2),
    "maxpool": lambda stage: StageGeometry(pool=True),
    "avgpool": lambda stage: StageGeometry(pool=True),
    "dilation": lambda stage: StageGeometry(dilation=2 ** (stage - 1)),
}
# Norm -> (affine parameters per channel, whether the conv before it keeps its bias). A bias before
# batch or group norm is cancelled by the mean subtraction, so the conv goes without.
NORM_PARAMS: dict[str, tuple[int, bool]] = {"batch": (2, False), "group": (2, False), "none": (0, True)}


def stage_geometry(downsample: str, stage: int) -> StageGeometry:
    """Geometry of stage ``stage`` (1-based) under ``downsample``; stage 1 never downsamples."""
    geometry = lookup(DOWNSAMPLING_GEOMETRY, downsample, "downsample")
    return StageGeometry() if stage == 1 else geometry(stage)


def _norm_params(norm: str) -> tuple[int, bool]:
    return lookup(NORM_PARAMS, norm, "norm")


def conv_has_bias(norm: str) -> bool:
    """Whether a conv followed by ``norm`` has a bias (only without a norm, which would cancel it)."""
    return _norm_params(norm)[1]


def _size(shape: Shape) -> str:
    return f"{shape[1]}x{shape[2]}"


def _conv_block(
    name: str, in_shape: Shape, out_channels: int, kernel: int, norm: str, *,
    stride: int = 1, dilation: int = 1, blame: str = "model.kernel_size", advice: str = "",
) -> LayerPlan:
    """Plan a ConvBlock (conv, norm, activation); InfeasibleArchitecture when the kernel outspans its input."""
    c, h, w = in_shape
    extent = dilation * (kernel - 1) + 1
    if extent > h or extent > w:
        what = f"the {kernel}x{kernel} kernel" + (f" dilated by {dilation} spans {extent}x{extent} and" if dilation > 1 else "")
        raise InfeasibleArchitecture(name, blame, f"{what} is larger than its {_size(in_shape)} input{advice}")
    pad = dilation * (kernel // 2)
    out_h = (h + 2 * pad - extent) // stride + 1
    out_w = (w + 2 * pad - extent) // stride + 1
    affine, bias = _norm_params(norm)
    params = out_channels * c * kernel * kernel + (out_channels if bias else 0) + affine * out_channels
    flops = 2 * out_channels * out_h * out_w * c * kernel * kernel
    return LayerPlan(name, "conv", in_shape, (out_channels, out_h, out_w), params, flops)


def _pool(name: str, kind: str, in_shape: Shape) -> LayerPlan:
    """Plan a 2x2, stride 2 pool; InfeasibleArchitecture when the map would shrink below 1x1."""
    c, h, w = in_shape
    if h < 2 or w < 2:
        raise InfeasibleArchitecture(
            name, "model.channels",
            f"a 2x2 {kind.replace('pool', ' pool')} would shrink the {_size(in_shape)} map below 1x1; "
            "use fewer stages or downsample='dilation'",
        )
    return LayerPlan(name, kind, in_shape, (c, h // 2, w // 2), 0, 0)


def _stages(model: ConvNetSpec, shape: Shape) -> list[LayerPlan]:
    layers: list[LayerPlan] = []
    for i, width in enumerate(model.channels, start=1):
        geometry = stage_geometry(model.downsample, i)
        if geometry.pool:
            layers.append(_pool(f"features.stage{i}.pool", model.downsample, shape))
            shape = layers[-1].out_shape
        # When only the dilation makes the kernel too big, the downsampling mode is what to change.
        dilated_out = geometry.dilation > 1 and model.kernel_size <= min(shape[1:])
        blame = "model.downsample" if dilated_out else "model.kernel_size"
        advice = (
            "; use fewer stages or another downsample" if dilated_out
            else "; use a smaller kernel_size" + (", fewer stages or less downsampling" if i > 1 else "")
        )
        for j in range(1, model.convs_per_stage + 1):
            layers.append(_conv_block(
                f"features.stage{i}.conv{j}", shape, width, model.kernel_size, model.norm,
                stride=geometry.stride if j == 1 else 1, dilation=geometry.dilation, blame=blame, advice=advice,
            ))
            shape = layers[-1].out_shape
    return layers


def _aspp(model: ConvNetSpec, in_shape: Shape) -> LayerPlan:
    """Plan the ASPP block as one layer: branches and projection summed."""
    assert model.aspp is not None, "_aspp is only called for a spec with ASPP"
    aspp, (_, h, w) = model.aspp, in_shape
    widest = max(model.aspp.rates)
    if 2 * widest + 1 > min(h, w):
        largest_ok = (min(h, w) - 1) // 2
        advice = f"use rates up to {largest_ok}" if largest_ok else "a 3x3 branch needs at least a 3x3 map; drop ASPP or downsample less"
        raise InfeasibleArchitecture(
            "features.aspp", "model.aspp.rates",
            f"the 3x3 branch with rate {widest} spans {2 * widest + 1}x{2 * widest + 1}, larger than its "
            f"{_size(in_shape)} input; {advice}",
        )
    parts = [_conv_block("features.aspp.branches.0", in_shape, aspp.channels, 1, model.norm)]
    parts += [
        _conv_block(f"features.aspp.branches.{n}", in_shape, aspp.channels, 3, model.norm, dilation=rate)
        for n, rate in enumerate(aspp.rates, start=1)
    ]
    concat: Shape = (aspp.channels * len(parts), h, w)
    parts.append(_conv_block("features.aspp.project", concat, aspp.channels, 1, model.norm))
    return LayerPlan(
        "features.aspp", "aspp", in_shape, parts[-1].out_shape,
        sum(p.params for p in parts), sum(p.flops for p in parts),
    )


def plan_network(model: ConvNetSpec, inp: InputInfo) -> NetworkPlan:
    """Plan every layer of ``model`` on ``inp``; raise InfeasibleArchitecture naming the first layer that cannot run."""
    layers = _stages(model, (inp.channels, inp.height, inp.width))
    if model.aspp is not None:
        layers.append(_aspp(model, layers[-1].out_shape))
    c = layers[-1].out_shape[0]
    k = inp.num_classes
    layers.append(LayerPlan("pool", "global_avgpool", layers[-1].out_shape, (c, 1, 1), 0, 0))
    layers.append(LayerPlan("head", "linear", (c, 1, 1), (k, 1, 1), c * k + k, 2 * c * k))
    return NetworkPlan(tuple(layers), sum(x.params for x in layers), sum(x.flops for x in layers))


def size_problem(plan: NetworkPlan, max_params: int, max_flops_per_sample: int) -> str | None:
    """What makes ``plan`` larger than a service's size limits (its parameters, else its forward FLOPs per sample); None when it fits.

    The API sizes every spec and every corner of a study's space with it, a worker every sampled
    configuration, each with its own settings of the same two limits.
    """
    if plan.params > max_params:
        return f"the network has {plan.params:,} parameters; this service allows at most {max_params:,} (CONVTUNE_MAX_PARAMS)"
    if plan.flops > max_flops_per_sample:
        return f"the network costs {plan.flops:,} FLOPs per sample; this service allows at most {max_flops_per_sample:,} (CONVTUNE_MAX_FLOPS_PER_SAMPLE)"
    return None
