"""The learning-rate range test's training: a growing LR, one optimizer step each, the loss at every step.

:func:`range_test` trains a trial spec's network from ``start_lr`` to ``end_lr`` and returns the
curve; reading the two LRs off it is torch-free (:mod:`models.spec.tuning`), logging it is the
worker's (:mod:`workers.trial.lr_finder`). It stops early once the loss blows up, and on the same
cancel flag and time limit as a trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from models.data.sets import load
from models.nets.convnet import build_model
from models.spec.plan import plan_network
from models.spec.tuning import LrRangeSpec
from workers.training.train import TrainingContext, make_loss, make_optimizer, requested_stop, resolve_batches

__all__ = ["Curve", "range_test"]


class Curve:
    """The steps of a range test so far: LR, raw loss and the early-stop moving average."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.ema: list[float] = []


def range_test(spec: LrRangeSpec, ctx: TrainingContext, on_steps: Callable[[Curve, int], None] | None = None) -> tuple[Curve, str]:
    """Train ``spec.trial``'s network with an exponentially growing LR; the curve and why it stopped.

    ``on_steps(curve, first_new_step)`` is called every ``ctx.check_every_steps`` steps and at the end.
    Raises Cancelled / TimedOut like a trial.
    """
    trial = spec.trial
    data = load(trial.data, ctx.data_root)
    x, y = torch.from_numpy(data.x_train).to(ctx.device), torch.from_numpy(data.y_train).to(ctx.device)
    loss_fn = make_loss(trial.model.head, data.info.num_classes)
    batch = resolve_batches(trial.model_copy(update={"devices": 1}), data.info, loss_fn, x, y, ctx).batch_size
    torch.manual_seed(trial.seed)
    model = build_model(trial.model, data.info).to(ctx.device).train()
    ctx.samples.flops_per_sample = plan_network(trial.model, data.info).flops
    optimizer = make_optimizer(model.parameters(), trial.optim.model_copy(update={"lr": spec.start_lr}))
    batches = _batches(len(x), batch, trial.seed, ctx.device)

    curve, reported, best = Curve(), 0, math.inf
    ema = weight = 0.0
    reason = f"reached end_lr {spec.end_lr:g} after {spec.steps} steps"
    for step in range(spec.steps):
        lr = spec.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = next(batches)
        ctx.samples.seen += len(idx)
        loss = loss_fn(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trial.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), trial.optim.grad_clip)
        optimizer.step()
        value = float(loss.detach())  # one sync per step: the test is short and needs every value
        ema, weight = spec.smoothing * ema + (1 - spec.smoothing) * value, spec.smoothing * weight + (1 - spec.smoothing)
        smoothed = ema / weight
        curve.lrs.append(lr), curve.losses.append(value), curve.ema.append(smoothed)
        if not math.isfinite(value):
            reason = f"the loss became {value} at step {step + 1}, lr {lr:.3g}"
            break
        best = min(best, smoothed)
        if step >= 5 and smoothed > spec.blowup_factor * best:
            reason = f"the smoothed loss {smoothed:.4g} passed {spec.blowup_factor:g}x its lowest {best:.4g} at step {step + 1}, lr {lr:.3g}"
            break
        if (step + 1) % ctx.check_every_steps == 0:
            stop = requested_stop(ctx, trial.time_limit_s, f"at step {step + 1}")
            if stop is not None:
                raise stop
            if on_steps is not None:
                on_steps(curve, reported)
                reported = len(curve.lrs)
    if on_steps is not None and reported < len(curve.lrs):
        on_steps(curve, reported)
    return curve, reason


def _batches(n: int, batch: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless batches of indices, reshuffled each pass over the data."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - 1, batch):
            idx = order[start : start + batch]
            if len(idx) >= 2:
                yield idx
