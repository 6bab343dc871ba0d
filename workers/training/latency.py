"""Inference latency of a trial's network on the worker's device, timed once at the end of training.

Called only when the trial spec asks for it (``TrialSpec.latency``: set by hand, or by a study whose
objectives or budgets name ``latency_ms``); a trial that does not ask pays nothing. The network is
built afresh from the spec: latency depends on the architecture and the device, not on the weights.
Each batch size is timed as the median of ``repeats`` forward passes after ``warmup`` untimed ones,
in eval mode without autograd, synchronising the device around each pass.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.data.roots import DataRoot
from models.data.sets import describe
from models.nets.convnet import build_model
from models.spec.trial import TrialSpec

__all__ = ["measure_latency"]


def measure_latency(spec: TrialSpec, device: torch.device, data_root: DataRoot | None) -> dict[str, float]:
    """``latency_ms`` (per sample at batch 1) and ``latency_ms_batch`` (per sample at ``spec.latency.batch``), in milliseconds."""
    assert spec.latency is not None, "measured only when the spec asks for it"
    info = describe(spec.data, data_root)
    assert info is not None, "a trial that trained has an input this worker can size"
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, info).to(device).eval()
    timed = {}
    for key, batch in (("latency_ms", 1), ("latency_ms_batch", spec.latency.batch)):
        x = torch.randn(batch, info.channels, info.height, info.width, device=device)  # (B, C, H, W)
        timed[key] = _median_ms(model, x, spec.latency.warmup, spec.latency.repeats) / batch
    return timed


@torch.inference_mode()
def _median_ms(model: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """The median wall time of one forward pass of ``x``, in milliseconds."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        _synchronize(x.device)
        start = time.perf_counter()
        model(x)
        _synchronize(x.device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
