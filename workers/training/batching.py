"""How a trial's batches are made: batch size (probed for ``auto``), accumulation, devices, scaled LR.

``batch_size: auto`` doubles a power-of-two batch from 2 up to ``max_batch_size`` (and the training
set, and the effective batch per device, which is tried first as it is) while a real forward,
backward and optimizer step of the trial's network fits the device:

- on a GPU, fits means no CUDA out-of-memory error and a peak of allocated memory within
  ``gpu_memory_fraction`` of the device's memory;
- on the CPU, where running out of memory kills the process instead of raising, fits means a peak
  of memory allocated during the step (measured by torch's profiler) plus the weights within the
  worker's configured ``cpu_memory_limit_mb``.

The probe trains a throwaway copy of the network, so the trial's own weights and batch-norm
statistics start untouched. ``effective_batch_size`` larger than ``batch_size x devices`` is
reached by accumulating gradients over several passes before each optimizer step; the learning
rate is then scaled from ``reference_batch_size`` to the effective batch by ``lr_scaling``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.spec.trial import OptimSpec, TrialSpec
from workers.errors import WorkerError

__all__ = ["BatchPlan", "BatchTooLarge", "MemoryProbe", "largest_fitting", "plan_batches", "scaled_lr"]

log = logging.getLogger(__name__)


class BatchTooLarge(WorkerError, MemoryError):
    """Even the smallest batch does not fit the device; classified as ``out_of_memory``."""


@dataclass(frozen=True)
class BatchPlan:
    """The resolved batches of a trial: per pass, passes per optimizer step, devices, and the LR used."""

    batch_size: int
    accumulate: int
    devices: int
    lr: float
    note: str = ""

    @property
    def effective(self) -> int:
        """Samples per optimizer step."""
        return self.batch_size * self.accumulate * self.devices


def scaled_lr(optim: OptimSpec, effective_batch: int) -> float:
    """The spec's lr scaled from its reference batch to ``effective_batch`` (``linear``, ``sqrt`` or ``none``)."""
    ratio = effective_batch / optim.reference_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim.lr_scaling]
    return optim.lr * factor


def largest_fitting(fits: Callable[[int], bool], upper: int, lower: int = 2) -> int:
    """The largest power of two in [lower, upper] for which ``fits`` holds, doubling from ``lower``.

    Raises BatchTooLarge when ``lower`` itself does not fit.
    """
    if not fits(lower):
        raise BatchTooLarge(f"not even a batch of {lower} fits this device's memory; use a smaller model or a larger memory limit")
    best = lower
    while best * 2 <= upper and fits(best * 2):
        best *= 2
    return best


def plan_batches(spec: TrialSpec, train_size: int, probe: Callable[[int], bool] | None) -> BatchPlan:
    """Resolve batch size, accumulation and LR; ``probe(batch)`` says whether a batch fits (auto only)."""
    o, devices = spec.optim, spec.devices
    per_device = max(1, train_size // devices)
    target = o.effective_batch_size
    note = ""
    if o.batch_size == "auto":
        assert probe is not None, "batch_size 'auto' needs a memory probe"
        wanted = math.ceil(target / devices) if target else None
        upper = max(2, min(o.max_batch_size, per_device, *([wanted] if wanted else [])))
        if wanted and wanted == upper and probe(wanted):
            # The whole effective batch fits in one pass: no accumulation needed.
            return BatchPlan(wanted, 1, devices, scaled_lr(o, wanted * devices), f"the effective batch fits in one pass of {wanted}")
        fitting = largest_fitting(probe, upper)
        note = f"largest power of two that fits, probed from 2 up to {upper}: {fitting}"
        if target:
            accumulate = math.ceil(target / (devices * fitting))
            batch = math.ceil(target / (devices * accumulate))
        else:
            accumulate, batch = 1, fitting
    else:
        batch = min(o.batch_size, per_device)
        accumulate = target // (o.batch_size * devices) if target else 1
    return BatchPlan(batch, accumulate, devices, scaled_lr(o, batch * accumulate * devices), note)


class MemoryProbe:
    """Does one training step of batch ``b`` fit? Trains a throwaway network built by ``build``."""

    def __init__(
        self, build: Callable[[], nn.Module], make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
        device: torch.device, cpu_limit_bytes: int, gpu_fraction: float = 0.9,
    ):
        self.build, self.make_optimizer, self.loss_fn = build, make_optimizer, loss_fn
        self.x, self.y, self.device = x, y, device
        self.cpu_limit_bytes, self.gpu_fraction = cpu_limit_bytes, gpu_fraction
        self.peaks: dict[int, int] = {}

    def __call__(self, batch: int) -> bool:
        model = self.build().to(self.device).train()
        optimizer = self.make_optimizer(model)
        try:
            peak = self._gpu_peak(model, optimizer, batch) if self.device.type == "cuda" else self._cpu_peak(model, optimizer, batch)
        except (torch.OutOfMemoryError, MemoryError):
            log.info("batch %d: out of memory", batch)
            return False
        finally:
            del model, optimizer
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.peaks[batch] = peak
        limit = self._limit()
        log.info("batch %d: peak %.1f MiB of %.1f MiB", batch, peak / 2**20, limit / 2**20)
        return peak <= limit

    def _limit(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory * self.gpu_fraction)
        return self.cpu_limit_bytes

    def _step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> None:
        idx = torch.arange(batch, device=self.x.device) % len(self.x)
        loss = self.loss_fn(model(self.x[idx].to(self.device)), self.y[idx].to(self.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _gpu_peak(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._step(model, optimizer, batch)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def _cpu_peak(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> int:
        from torch.profiler import ProfilerActivity, profile  # kineto prints a start and a stop line on stderr

        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self._step(model, optimizer, batch)
        # Memory events carry signed sizes (allocations +, frees -): their running sum peaks at the step's peak.
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        return weights + peak
