"""The trial spec: the one description of a training run.

It validates the HTTP body, travels as the Celery payload (``model_dump(mode="json")``), is
re-validated in the worker and is flattened into MLflow params (:func:`flatten_params`). There
is no second description of a trial anywhere. This module must not import torch.
"""

from __future__ import annotations

import json
import posixpath
from typing import Annotated, Any, Literal

from pydantic import Field, HttpUrl, field_validator, model_validator

from models.spec.base import Spec
from models.spec.choices import ACTIVATIONS, DOWNSAMPLING, NORMS, OPTIMIZERS, SCHEDULES

__all__ = [
    "ACTIVATIONS",
    "DOWNSAMPLING",
    "NON_HYPERPARAMETERS",
    "NORMS",
    "OPTIMIZERS",
    "SCHEDULES",
    "AsppSpec",
    "ConvNetSpec",
    "DataSpec",
    "DivergenceSpec",
    "LatencySpec",
    "OptimSpec",
    "Priority",
    "TrialSpec",
    "flatten_params",
]

BUILTIN_DATASETS = ("digits", "shapes")
# Order within a team's share of the workers: a team's high goes before its normal, before its low; never
# ahead of another team's share (models.store.share).
Priority = Literal["low", "normal", "high"]
FILE_DATASETS = ("npz", "folder")

# TrialSpec fields that say what a run is called, where it runs, whom it tells and what it measures, not how it trains:
# they are not MLflow params (flatten_params) and a study cannot search them (models.spec.space).
NON_HYPERPARAMETERS = ("name", "tags", "queue", "priority", "callback_url", "latency")

# Optimizers that take a momentum term, and those that take Adam's betas (models.spec.choices says which).
MOMENTUM_OPTIMIZERS = tuple(name for name, choice in OPTIMIZERS.items() if "momentum" in choice.options)
BETAS_OPTIMIZERS = tuple(name for name, choice in OPTIMIZERS.items() if "betas" in choice.options)

# The names of models.spec.choices, in its order: the JSON schema's enums and the error messages list them so.
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
Norm = Literal[tuple(NORMS)]  # type: ignore[valid-type]
Downsampling = Literal[tuple(DOWNSAMPLING)]  # type: ignore[valid-type]
Optimizer = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]
Schedule = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]
Channels = Annotated[int, Field(ge=1, le=2048)]


class AsppSpec(Spec):
    """Atrous Spatial Pyramid Pooling after the last stage (DeepLab's ASPP, without image pooling).

    One 1x1 branch plus one 3x3 branch per dilation rate, run in parallel on the same map,
    concatenated and projected back to ``channels`` by a 1x1 conv. Resolution is kept.
    """

    rates: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default=[1, 2, 3], min_length=1, max_length=6,
        description="Dilation rate of each 3x3 branch.",
    )
    channels: Channels = Field(default=64, description="Channels of each branch and of the output.")

    @field_validator("rates")
    @classmethod
    def _distinct_rates(cls, rates: list[int]) -> list[int]:
        if len(set(rates)) != len(rates):
            raise ValueError("rates must be distinct")
        return rates


class ConvNetSpec(Spec):
    """The architecture: conv stages, how they downsample, and the output head."""

    channels: list[Channels] = Field(
        default=[32, 64], min_length=1, max_length=8,
        description="Output channels of each stage (the number of stages is its length).",
    )
    convs_per_stage: int = Field(default=2, ge=1, le=6)
    kernel_size: int = Field(default=3, ge=1, le=27, description="Odd, square kernel of every stage conv.")
    downsample: Downsampling = Field(
        default="maxpool",
        description=(
            "Between stages: 'stride' (first conv of the stage has stride 2), 'maxpool' / 'avgpool' "
            "(2x2, stride 2, before the stage), or 'dilation' (no downsampling; stage i, counted from 1, "
            "uses dilation 2**(i-1))."
        ),
    )
    aspp: AsppSpec | None = Field(default=None, description="Optional ASPP block after the last stage.")
    activation: Activation = "relu"
    norm: Norm = "batch"
    norm_groups: int = Field(default=8, ge=1, le=512, description="Groups of 'group' norm; must divide every channel count.")
    dropout: float = Field(default=0.0, ge=0.0, le=0.9, description="Dropout before the output layer.")
    head: Literal["logits", "sigmoid"] = Field(
        default="logits",
        description="The output layer has no activation and no normalisation ('logits'); 'sigmoid' bounds it to (0, 1).",
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that padding keeps the map centred, got {k}")
        return k

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> ConvNetSpec:
        if self.norm == "group":
            widths = list(self.channels) + ([self.aspp.channels] if self.aspp else [])
            bad = [c for c in widths if c % self.norm_groups]
            if bad:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every channel count; it does not divide {bad}")
        return self


class OptimSpec(Spec):
    """How the network is optimised: optimizer, learning rate and its schedule, batch, epochs."""

    optimizer: Optimizer = "adamw"
    lr: float = Field(default=1e-3, gt=0.0, le=10.0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    momentum: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="For 'momentum', 'nesterov' and 'rmsprop' only; defaults to 0.9 for 'momentum'/'nesterov', 0 for 'rmsprop'.",
    )
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        default=None, description="For 'adam' and 'adamw' only; defaults to (0.9, 0.999).",
    )
    batch_size: int | Literal["auto"] = Field(
        default=32,
        description=(
            "Samples per forward/backward pass on one device, or 'auto': the largest power of two (up to "
            "max_batch_size) whose forward/backward pass fits the device's memory, found by probing."
        ),
    )
    max_batch_size: int = Field(default=1024, ge=1, le=8192, description="Upper bound of batch_size 'auto'.")
    effective_batch_size: int | None = Field(
        default=None, ge=1, le=65536,
        description=(
            "Samples per optimizer step, over all devices and accumulated passes (gradient accumulation). "
            "Default: batch_size x devices, no accumulation."
        ),
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        default="none",
        description="Scale lr by (effective batch / reference_batch_size) ('linear') or its square root ('sqrt').",
    )
    reference_batch_size: int = Field(default=32, ge=1, le=65536, description="The batch size lr was chosen for (lr_scaling).")
    epochs: int = Field(default=10, ge=1, le=1000)
    schedule: Schedule = "none"
    step_size: int = Field(default=5, ge=1, le=1000, description="Epochs between decays of the 'step' schedule.")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="Decay factor of 'step' (per step_size) and 'exponential' (per epoch).")
    warmup_epochs: int = Field(default=0, ge=0, le=100, description="Linear warm-up from lr/100; not with 'onecycle', which warms up itself.")
    grad_clip: float | None = Field(default=None, gt=0.0, le=1e6, description="Clip the global gradient norm to this value.")

    @model_validator(mode="after")
    def _conditional_fields(self) -> OptimSpec:
        if self.momentum is not None and self.optimizer not in MOMENTUM_OPTIMIZERS:
            raise ValueError(f"momentum applies to {', '.join(MOMENTUM_OPTIMIZERS)} only, not {self.optimizer!r}")
        if self.betas is not None and self.optimizer not in BETAS_OPTIMIZERS:
            raise ValueError(f"betas apply to {', '.join(BETAS_OPTIMIZERS)} only, not {self.optimizer!r}")
        if self.warmup_epochs and self.schedule == "onecycle":
            raise ValueError("warmup_epochs cannot be combined with the 'onecycle' schedule, which has its own warm-up")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
        return self

    @field_validator("batch_size")
    @classmethod
    def _batch_size_bounds(cls, batch_size: int | str) -> int | str:
        if isinstance(batch_size, int) and not 1 <= batch_size <= 8192:
            raise ValueError(f"batch_size must be 'auto' or an integer in [1, 8192], got {batch_size}")
        return batch_size


class DataSpec(Spec):
    """Where the images come from and how they are split.

    Built-ins need no files: ``digits`` (scikit-learn's 8x8 digits, 1 channel, 10 classes) and
    ``shapes`` (procedural coloured shapes, 3 channels, deterministic from ``seed``). A team's own
    data is an ``npz`` file (arrays ``images`` as N,H,W or N,H,W,C or N,C,H,W and integer
    ``labels``) or a ``folder`` of images with one sub-folder per class, named by ``path``
    relative to the data root that workers share.
    """

    name: Literal["digits", "shapes", "npz", "folder"] = "digits"
    path: str | None = Field(default=None, max_length=512, description="Relative to the data root; for 'npz' and 'folder' only.")
    val_fraction: float = Field(default=0.2, ge=0.05, le=0.5)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the train/validation split and of 'shapes'.")
    num_classes: int = Field(default=4, ge=2, le=8, description="'shapes' only: how many shape classes.")
    num_samples: int = Field(default=2000, ge=100, le=50_000, description="'shapes' only: how many images.")
    image_size: int = Field(default=32, ge=8, le=128, description="'shapes' only: side of the square images.")

    @field_validator("path")
    @classmethod
    def _relative_path(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if "\\" in path or "\x00" in path:
            raise ValueError("path must use '/' separators and no NUL bytes")
        normalised = posixpath.normpath(path)
        if path.startswith("/") or normalised == ".." or normalised.startswith("../"):
            raise ValueError(f"path must stay inside the data root, got {path!r}")
        return normalised

    @model_validator(mode="after")
    def _path_iff_file_dataset(self) -> DataSpec:
        if self.name in FILE_DATASETS and self.path is None:
            raise ValueError(f"dataset {self.name!r} needs a 'path' relative to the data root")
        if self.name in BUILTIN_DATASETS and self.path is not None:
            raise ValueError(f"built-in dataset {self.name!r} takes no 'path'")
        return self


class DivergenceSpec(Spec):
    """When the training loop ends a trial as ``diverged`` (docs/tuning.md has the rules).

    A loss that is NaN or infinite ends it at once. So does a smoothed loss (an exponential moving
    average of the step losses) above ``rise_factor`` times the first step's loss, judged from
    ``min_steps`` on. And a trial whose epoch-mean training loss stayed above ``(1 - min_progress)``
    times the first step's loss for ``stall_epochs`` epochs in a row made no progress.
    """

    enabled: bool = Field(default=True, description="Check the loss at all; false trains to the end whatever it does.")
    rise_factor: float = Field(default=4.0, ge=1.5, le=1e6, description="Smoothed loss above this multiple of the first step's loss: diverged.")
    smoothing: float = Field(default=0.9, ge=0.0, lt=1.0, description="Weight of the past in the moving average of the step loss.")
    min_steps: int = Field(default=5, ge=1, le=10_000, description="Steps before the rise rule is judged (NaN/Inf are judged from step 1).")
    stall_epochs: int | None = Field(default=3, ge=1, le=1000, description="Epochs in a row without progress that end the trial; null: never.")
    min_progress: float = Field(default=0.02, gt=0.0, lt=1.0, description="Fraction of the first loss an epoch's mean loss must have shed to count as progress.")


class LatencySpec(Spec):
    """Measure inference latency at the end of training (workers.training.latency), logged as metrics.

    ``latency_ms``: milliseconds per sample at batch 1; ``latency_ms_batch``: per sample at ``batch``;
    each the median of ``repeats`` timed forward passes after ``warmup`` untimed ones, on the worker's device.
    """

    batch: int = Field(default=32, ge=1, le=4096, description="The stated batch of latency_ms_batch.")
    warmup: int = Field(default=5, ge=0, le=1000, description="Untimed forward passes first (caches, allocator, kernels).")
    repeats: int = Field(default=20, ge=1, le=10_000, description="Timed forward passes; the median is logged.")


class TrialSpec(Spec):
    """One training run: architecture, optimisation, data and budget."""

    model: ConvNetSpec = Field(default_factory=ConvNetSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of weights init and batch order.")
    devices: int = Field(
        default=1, ge=1, le=64,
        description="Train data-parallel on this many devices (one process each); global batch = batch_size x devices.",
    )
    divergence: DivergenceSpec = Field(default_factory=DivergenceSpec)
    time_limit_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="Wall-clock limit of the training; the trial ends 'timeout' past it.")
    queue: Literal["gpu", "cpu"] | None = Field(default=None, description="Resource class to run on; the service's default when absent.")
    priority: Priority = Field(
        default="normal",
        description="Its place among its team's waiting work (high first, then FIFO); never ahead of another team's share. In a study, the study's priority counts.",
    )
    name: str | None = Field(default=None, max_length=200, description="A human name for the run; derived from the params when absent.")
    tags: dict[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=20, description="Free-form tags copied to the MLflow run.",
    )
    callback_url: HttpUrl | None = Field(
        default=None,
        description="Receives a POST signed for the team (Standard Webhooks, HMAC-SHA256) when the trial ends; retried with backoff. Never written to MLflow.",
    )
    latency: LatencySpec | None = Field(
        default=None, description="Measure inference latency at the end of training (latency_ms, latency_ms_batch metrics); off when absent.",
    )

    @model_validator(mode="after")
    def _effective_batch_divides(self) -> TrialSpec:
        o = self.optim
        if isinstance(o.batch_size, int) and o.effective_batch_size is not None:
            per_step = o.batch_size * self.devices
            if o.effective_batch_size % per_step:
                raise ValueError(
                    f"optim.effective_batch_size ({o.effective_batch_size}) must be a multiple of batch_size x devices ({per_step}): "
                    "it is reached by accumulating whole passes"
                )
        return self

    def display_name(self) -> str:
        """Name a person can read in a list of runs, e.g. ``lr=3e-03 bs=32 k3 maxpool relu``."""
        if self.name:
            return self.name
        m, o = self.model, self.optim
        aspp = " aspp" if m.aspp else ""
        return f"lr={o.lr:.0e} bs={o.batch_size} k{m.kernel_size} {m.downsample}{aspp} {m.activation} {o.optimizer}"


def flatten_params(spec: TrialSpec) -> dict[str, str]:
    """Flatten a spec into dotted MLflow params (``optim.lr``), skipping the :data:`NON_HYPERPARAMETERS`.

    Lists and nested values are JSON-encoded; MLflow params are strings of at most 6,000 chars.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = json.dumps(value)
        else:
            flat[prefix] = "None" if value is None else str(value)

    walk("", spec.model_dump(mode="json", exclude=set(NON_HYPERPARAMETERS)))
    return flat
