"""Training one trial: ``run_trial(spec, tracker, ctx) -> TrialResult``, read top to bottom.

Data lives in memory as tensors (on the GPU when there is one) and is batched by index: the data
sets are small and a DataLoader's worker processes would cost more than they save. Every epoch
ends with an evaluation, one batched metrics call to the tracker and a checkpoint, so a trial
redelivered after its worker died resumes from its last finished epoch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.convnet import build_model
from models.data import load
from models.shapes import plan_network
from models.spec import OptimSpec, TrialSpec
from workers.outcomes import Cancelled, TimedOut

__all__ = ["TrialContext", "TrialResult", "Tracker", "evaluate", "run_trial", "train_one_epoch"]


class Tracker(Protocol):
    """Where a trial's results go (MLflow in the worker, a list in tests)."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, rows: list[dict[str, Any]]) -> None: ...
    def log_result(self, model: nn.Module, example: torch.Tensor, history: list[dict[str, float]]) -> None: ...


@dataclass
class TrialContext:
    """What a worker gives a trial besides its spec."""

    device: torch.device
    data_root: Path | None = None
    checkpoint_path: Path | None = None
    should_cancel: Callable[[], bool] = lambda: False
    check_every_steps: int = 50
    # Called after every epoch with (epoch, metrics); a study's pruner raises Pruned from here.
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class TrialResult:
    epochs_done: int
    metrics: dict[str, float]
    best_val_accuracy: float
    best_epoch: int
    history: list[dict[str, float]]


def run_trial(spec: TrialSpec, tracker: Tracker, ctx: TrialContext) -> TrialResult:
    """Train ``spec`` to the end of its epochs and log everything to ``tracker``."""
    torch.manual_seed(spec.seed)
    data = load(spec.data, ctx.data_root)
    x_train, y_train, x_val, y_val = (torch.from_numpy(a).to(ctx.device) for a in (data.x_train, data.y_train, data.x_val, data.y_val))
    model = build_model(spec.model, data.info).to(ctx.device)
    loss_fn = make_loss(spec.model.head, data.info.num_classes)
    batch_size = min(spec.optim.batch_size, len(x_train))
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    optimizer = make_optimizer(model.parameters(), spec.optim)
    scheduler = make_scheduler(optimizer, spec.optim, steps_per_epoch)

    history: list[dict[str, float]] = []
    start_epoch = 1 + restore_checkpoint(ctx.checkpoint_path, model, optimizer, scheduler, history)
    if start_epoch == 1:
        tracker.log_summary(plan_network(spec.model, data.info).summary())
    guard = _Guard(spec, ctx)

    for epoch in range(start_epoch, spec.optim.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(spec.seed * 10_007 + epoch))
        train_loss = train_one_epoch(model, optimizer, scheduler, loss_fn, x_train, y_train, order.to(ctx.device), batch_size, spec.optim.grad_clip, guard)
        train_seconds = time.perf_counter() - t0
        val_loss, val_accuracy = evaluate(model, loss_fn, x_val, y_val)
        metrics = {
            "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
            "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
            "samples_per_second": len(x_train) / max(train_seconds, 1e-9),
        }
        history.append(metrics)
        tracker.log_epoch(epoch, metrics)
        save_checkpoint(ctx.checkpoint_path, epoch, model, optimizer, scheduler, history)
        if ctx.on_epoch_end is not None:
            ctx.on_epoch_end(epoch, metrics)
        guard.check_epoch(epoch)

    tracker.log_result(model, x_val[:2], history)  # batch > 1: the exported model keeps a dynamic batch
    best_epoch, best = max(enumerate(history, start=1), key=lambda em: em[1]["val_accuracy"])
    return TrialResult(len(history), history[-1], best["val_accuracy"], best_epoch, history)


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, grad_clip: float | None, guard: _Guard,
) -> float:
    """One pass over ``x`` in the given ``order``; the mean training loss."""
    model.train()
    total, seen = torch.zeros((), device=x.device), 0
    for step, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and seen:
            break  # a lone last sample would break batch norm's statistics
        logits = model(x[idx])  # (B, K)
        loss = loss_fn(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.detach() * len(idx)
        seen += len(idx)
        guard.check_step(step)
    return float(total) / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])  # (B, K)
        target = y[start : start + chunk]
        loss_sum += float(loss_fn(logits, target)) * len(target)
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / len(x), correct / len(x)


def make_loss(head: str, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on logits; for a sigmoid head, per-class binary cross-entropy on the same logits."""
    if head == "sigmoid":
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, F.one_hot(y, num_classes).to(logits.dtype))
    return F.cross_entropy


OPTIMIZERS: dict[str, Callable[[Any, OptimSpec], torch.optim.Optimizer]] = {
    "sgd": lambda p, o: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay),
    "momentum": lambda p, o: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay, momentum=_or(o.momentum, 0.9)),
    "nesterov": lambda p, o: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay, momentum=_or(o.momentum, 0.9), nesterov=True),
    "adam": lambda p, o: torch.optim.Adam(p, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas or (0.9, 0.999)),
    "adamw": lambda p, o: torch.optim.AdamW(p, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas or (0.9, 0.999)),
    "rmsprop": lambda p, o: torch.optim.RMSprop(p, lr=o.lr, weight_decay=o.weight_decay, momentum=_or(o.momentum, 0.0)),
}


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def make_optimizer(params: Any, optim: OptimSpec) -> torch.optim.Optimizer:
    return OPTIMIZERS[optim.optimizer](params, optim)


# Each schedule is the LR multiplier at a (fractional) epoch t after warm-up, over `span` epochs.
SCHEDULES: dict[str, Callable[[float, float, OptimSpec], float]] = {
    "none": lambda t, span, o: 1.0,
    "step": lambda t, span, o: o.gamma ** math.floor(t / o.step_size),
    "exponential": lambda t, span, o: o.gamma ** math.floor(t),
    "cosine": lambda t, span, o: 0.5 * (1.0 + math.cos(math.pi * min(t / span, 1.0))),
}


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSpec, steps_per_epoch: int) -> Any:
    """A per-step scheduler: linear warm-up from lr/100, then the spec's schedule."""
    total_steps = optim.epochs * steps_per_epoch
    if optim.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optim.lr, total_steps=total_steps)
    decay = SCHEDULES[optim.schedule]
    span = float(optim.epochs - optim.warmup_epochs)

    def factor(step: int) -> float:
        t = step / steps_per_epoch
        if t < optim.warmup_epochs:
            return 0.01 + 0.99 * t / optim.warmup_epochs
        return decay(t - optim.warmup_epochs, span, optim)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Guard:
    """Cooperative stops: the cancel flag every N steps and each epoch, the time limit likewise."""

    def __init__(self, spec: TrialSpec, ctx: TrialContext):
        self.limit_s = spec.time_limit_s
        self.ctx = ctx

    def check_step(self, step: int) -> None:
        if step and step % self.ctx.check_every_steps == 0:
            self._check(f"at step {step}")

    def check_epoch(self, epoch: int) -> None:
        self._check(f"after epoch {epoch}")

    def _check(self, where: str) -> None:
        if self.ctx.should_cancel():
            raise Cancelled(f"cancelled on request, {where}")
        elapsed = time.monotonic() - self.ctx.started
        if self.limit_s is not None and elapsed > self.limit_s:
            raise TimedOut(f"ran {elapsed:.1f}s, past its time_limit_s of {self.limit_s:g}s, {where}")


def save_checkpoint(path: Path | None, epoch: int, model: nn.Module, optimizer: Any, scheduler: Any, history: list[dict[str, float]]) -> None:
    """Write the state after ``epoch`` atomically, so a crash mid-write leaves the previous one."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history}
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore_checkpoint(path: Path | None, model: nn.Module, optimizer: Any, scheduler: Any, history: list[dict[str, float]]) -> int:
    """Load the last checkpoint into the given objects; the epoch it ended (0 when none)."""
    if path is None or not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    history.extend(state["history"])
    return int(state["epoch"])

