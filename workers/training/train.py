"""Training one trial: ``run_trial(spec, tracker, ctx) -> TrialResult``, read top to bottom.

Data lives in memory as tensors (on the GPU when there is one), built once per process for the
built-in sets (:mod:`workers.training.data`), and is batched by index: the data sets are small and
a DataLoader's worker processes would cost more than they save. Every epoch
ends with an evaluation, one batched metrics call to the tracker and a checkpoint, so a trial
redelivered after its worker died resumes from its last finished epoch.

A trial's checkpoints are fenced: the holder of lease fence ``f`` writes ``<run>.f<f>.pt`` (never
another holder's file), a delivery resumes from the highest fence there is, and a holder removes
the lower ones once its own first checkpoint is written. A worker that lost the trial and wakes up
late can then only write a file nobody reads, never replace a later holder's checkpoint.
``<run>.pt`` itself is fence 0: what a caller without a lease (a test, a tool) writes and reads.
"""

from __future__ import annotations

import copy
import glob
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR, StepLR

from models.compat import torch_state
from models.data.roots import DataRoot
from models.data.sets import RawInput
from models.nets.convnet import build_model
from models.spec.choices import lookup
from models.spec.plan import InputInfo, plan_network
from models.spec.trial import OptimSpec, TrialSpec
from workers.errors import WorkerError
from workers.training.batching import BatchPlan, MemoryProbe, plan_batches
from workers.training.data import device_data
from workers.training.divergence import DivergenceDetector
from workers.training.outcomes import Cancelled, Superseded, TimedOut, TrialStopped
from workers.training.parallel import Parallel

__all__ = [
    "CheckpointWriter", "Evaluation", "ServedInputs", "Tracker", "TrainedSamples", "TrainingContext", "TrialResult", "checkpoint_files", "checkpoint_run", "evaluate",
    "fenced_checkpoint", "remove_checkpoints", "requested_stop", "resolve_batches", "run_trial", "train_one_epoch",
]

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Where a trial's results go (MLflow in the worker, a list in tests)."""

    def log_epoch(self, epoch: int, metrics: dict[str, float], at_ms: int | None = None, after: Future | None = None) -> None:
        """``metrics`` of ``epoch``, stamped ``at_ms`` (when the epoch ended; None: now), sent once ``after`` (its checkpoint's write) is done.

        A delivery that resumes offers its checkpoint's epochs again with their stamps: a metric both it and a
        paused predecessor send is then the same row in MLflow (same key, step, value and timestamp), not two.
        """

    def log_summary(self, rows: list[dict[str, Any]]) -> None: ...

    def log_result(self, model: nn.Module, example: torch.Tensor, history: list[dict[str, float]], served: ServedInputs | None = None) -> None:
        """At the end of training: the curves and the model; ``served``: what the model is served with (raw input, classes)."""


@dataclass(frozen=True)
class ServedInputs:
    """What serving the trained net takes besides its weights: the raw images (their statistics normalise them), the classes, the head."""

    info: InputInfo
    raw: RawInput | None  # None: a data set that does not say (the model then takes normalised (N, C, H, W) float32)
    class_names: list[str]
    head: str  # the spec's: "logits" (the net's outputs are softmaxed) or "sigmoid" (they are probabilities already)


@dataclass
class TrainedSamples:
    """What a delivery trained, for its accounting: samples through a training step (every rank's), and the
    network's forward FLOPs per sample. Shared by reference with a data-parallel trial's rank 0 context."""

    seen: int = 0
    flops_per_sample: int = 0

    @property
    def train_flops(self) -> float:
        """Forward and backward (about twice the forward) FLOPs of the samples seen."""
        return 3.0 * self.flops_per_sample * self.seen


@dataclass
class TrainingContext:
    """What a worker gives a training run (a trial, or an LR range test) besides its spec."""

    device: torch.device
    data_root: DataRoot | None = None  # as the run's team sees it (models.data.roots)
    # The trial's checkpoint, as its base name (``<run>.pt``): the fenced files are found from it (see the module's doc).
    checkpoint_path: Path | None = None
    # The fence of this delivery's lease: its checkpoints are written as ``<run>.f<fence>.pt`` (0: as ``checkpoint_path``).
    fence: int = 0
    should_cancel: Callable[[], bool] = lambda: False
    # Whether this worker still holds the trial (its lease); False stops training without writing anything more.
    still_owner: Callable[[], bool] = lambda: True
    # The same, asked of the lease's store itself, before a checkpoint is written (None: ``still_owner``).
    confirm_owner: Callable[[], bool] | None = None
    check_every_steps: int = 50
    # Called after every epoch with (epoch, metrics); a study's pruner raises Pruned from here.
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    # Called once when a delivery resumes from a checkpoint, with the epochs' metrics it restored (before any on_epoch_end):
    # a study's objective judges a best_epoch over all of them, not over the epochs after the resume only.
    on_resume: Callable[[list[dict[str, float]]], None] | None = None
    # Called once the batches are resolved, with tags naming them (batch size, accumulation, effective LR).
    on_setup: Callable[[BatchPlan], None] | None = None
    # Called (before on_setup) when the checkpoint there was could not be read, with why: training starts again from epoch 1.
    on_checkpoint_lost: Callable[[str], None] | None = None
    # What batch_size 'auto' may use on the CPU (a GPU's limit is its own memory).
    cpu_memory_limit_bytes: int = 2 * 2**30
    gpu_memory_fraction: float = 0.9
    # Set on every rank of a data-parallel trial (workers.training.devices); None trains in this process alone.
    parallel: Parallel | None = None
    started: float = field(default_factory=time.monotonic)
    # Counted as it trains (workers.trial.accounting reads it at the end).
    samples: TrainedSamples = field(default_factory=TrainedSamples)


@dataclass
class TrialResult:
    epochs_done: int
    metrics: dict[str, float]
    best_val_accuracy: float
    best_epoch: int
    history: list[dict[str, float]]
    # Of the final model on the validation set: confusion[true][predicted] counts.
    confusion: list[list[int]] | None = None
    class_names: list[str] | None = None
    batches: BatchPlan | None = None


def run_trial(spec: TrialSpec, tracker: Tracker, ctx: TrainingContext) -> TrialResult:
    """Train ``spec`` to the end of its epochs and log everything to ``tracker``."""
    data = device_data(spec.data, ctx.data_root, ctx.device)
    x_train, y_train, x_val, y_val = data.x_train, data.y_train, data.x_val, data.y_val
    loss_fn = make_loss(spec.model.head, data.info.num_classes)
    batches = resolve_batches(spec, data.info, loss_fn, x_train, y_train, ctx)
    optim = spec.optim.model_copy(update={"lr": batches.lr})
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.info).to(ctx.device)
    net = model if ctx.parallel is None else ctx.parallel.wrap(model)
    model = getattr(net, "module", net)  # the bare network: checkpoints, evaluation, the logged model
    steps_per_epoch = math.ceil(len(x_train) / batches.effective)
    optimizer = make_optimizer(net.parameters(), optim)
    scheduler = make_scheduler(optimizer, optim, steps_per_epoch)

    history: list[dict[str, float]] = []
    stamps: list[int] = []  # when each epoch of the history ended (ms): its metrics' timestamp
    evaluation: Evaluation | None = None
    guard = _Guard(spec, ctx)
    try:
        start_epoch = 1 + restore_checkpoint(ctx.checkpoint_path, model, optimizer, scheduler, history, guard.divergence, stamps)
    except UnreadableCheckpoint as exc:  # a lost checkpoint: the trial trains again from its first epoch
        log.warning("%s", exc)
        if ctx.on_checkpoint_lost is not None:
            ctx.on_checkpoint_lost(str(exc))
        torch.manual_seed(spec.seed)  # the state a first attempt starts from: restore_checkpoint may have loaded part of it
        model.load_state_dict(build_model(spec.model, data.info).state_dict())
        optimizer = make_optimizer(net.parameters(), optim)
        scheduler = make_scheduler(optimizer, optim, steps_per_epoch)
        history.clear()
        stamps.clear()
        guard = _Guard(spec, ctx)
        start_epoch = 1
    network_plan = plan_network(spec.model, data.info)
    ctx.samples.flops_per_sample = network_plan.flops
    if start_epoch == 1:
        tracker.log_summary(network_plan.summary())
    elif ctx.on_resume is not None:
        ctx.on_resume([dict(h) for h in history])
    for epoch, metrics in enumerate(history, start=1):  # resumed: the checkpoint's epochs the run may lack (logged once)
        tracker.log_epoch(epoch, metrics, at_ms=stamps[epoch - 1] if epoch <= len(stamps) else None)
    if ctx.on_setup is not None:
        ctx.on_setup(batches)

    # Written on a thread of their own while the next epoch trains; none lands after this delivery ends.
    with CheckpointWriter(ctx.checkpoint_path, ctx.confirm_owner or ctx.still_owner, ctx.fence) as checkpoints:
        for epoch in range(start_epoch, spec.optim.epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(spec.seed * 10_007 + epoch))
            guard.divergence.start_epoch(epoch)
            train_loss = train_one_epoch(
                net, optimizer, scheduler, loss_fn, x_train, y_train, order.to(ctx.device), batches.batch_size, spec.optim.grad_clip, guard,
                accumulate=batches.accumulate, parallel=ctx.parallel,
            )
            train_seconds = time.perf_counter() - t0
            evaluation = evaluate(model, loss_fn, x_val, y_val, data.info.num_classes)
            val_loss, val_accuracy = evaluation.loss, evaluation.accuracy
            metrics = {
                "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
                "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
                "samples_per_second": len(x_train) / max(train_seconds, 1e-9),
            }
            history.append(metrics)
            stamps.append(int(time.time() * 1000))
            guard.check_owner(epoch)  # a worker that lost the trial neither logs nor checkpoints: the next holder does
            saved: Future | None = None
            try:
                guard.divergence.end_epoch(epoch, train_loss, metrics["lr"])
                # The last epoch needs none: the run ends next (a delivery that dies first trains that epoch again, logged once).
                if epoch < spec.optim.epochs and (ctx.parallel is None or ctx.parallel.rank == 0) and ctx.still_owner():
                    saved = checkpoints.save(epoch, model, optimizer, scheduler, history, guard.divergence, stamps)
            except BaseException:
                tracker.log_epoch(epoch, metrics, at_ms=stamps[-1])  # a diverged epoch is logged too
                raise
            # Its metrics go once its checkpoint is written: metrics a paused worker still sends are then always of
            # an epoch the next holder resumes from and offers again, with the same stamp (one row in MLflow).
            tracker.log_epoch(epoch, metrics, at_ms=stamps[-1], after=saved)
            stop = None
            if ctx.on_epoch_end is not None:
                try:
                    ctx.on_epoch_end(epoch, metrics)
                except TrialStopped as exc:  # every rank of a data-parallel trial must hear of it first
                    stop = exc
            guard.check_epoch(epoch, stop)

    served = ServedInputs(data.info, data.raw, list(data.class_names), spec.model.head)
    tracker.log_result(model, x_val[:2], history, served)  # batch > 1: the exported model keeps a dynamic batch
    best_epoch, best = max(enumerate(history, start=1), key=lambda em: em[1]["val_accuracy"])
    if evaluation is None:  # this delivery trained no epoch (a resumed trial whose epochs were all done)
        evaluation = evaluate(model, loss_fn, x_val, y_val, data.info.num_classes)
    confusion = evaluation.confusion.tolist()  # the final model's, from its last evaluation
    return TrialResult(len(history), history[-1], best["val_accuracy"], best_epoch, history, confusion, data.class_names, batches)


def resolve_batches(
    spec: TrialSpec, info: Any, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor, y: torch.Tensor, ctx: TrainingContext,
) -> BatchPlan:
    """Batch size (probed for 'auto'), gradient accumulation and the scaled LR; the same on every rank."""
    probe = None
    if spec.optim.batch_size == "auto":
        probe = MemoryProbe(
            lambda: build_model(spec.model, info), lambda m: make_optimizer(m.parameters(), spec.optim), loss_fn, x, y,
            ctx.device, ctx.cpu_memory_limit_bytes, ctx.gpu_memory_fraction,
        )
    batches = plan_batches(spec, len(x), probe)
    if ctx.parallel is not None and probe is not None:
        # Ranks may probe differently (other GPUs, other free memory): all take the smallest.
        smallest = ctx.parallel.smallest(batches.batch_size)
        if smallest != batches.batch_size:
            batches = plan_batches(spec, len(x), lambda b: b <= smallest)
    return batches


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, grad_clip: float | None, guard: _Guard,
    accumulate: int = 1, parallel: Parallel | None = None,
) -> float:
    """One pass over ``x`` in the given ``order``; the mean training loss.

    Each optimizer step takes ``batch_size x accumulate x ranks`` samples of ``order``: this rank's
    slice of them, in ``accumulate`` passes whose gradients add up to that of their mean loss.
    """
    model.train()
    world = 1 if parallel is None else parallel.world
    total, seen = torch.zeros((), device=x.device), 0
    losses: list[torch.Tensor] = []  # each step's mean loss, added to total a batch of steps at a time, not per step
    sizes: list[int] = []
    per_step = batch_size * accumulate * world
    for step, start in enumerate(range(0, len(order), per_step)):
        idx = order[start : start + per_step]
        if len(idx) < 2 * world and seen:
            break  # a lone last sample would break batch norm's statistics
        local = idx if parallel is None else parallel.shard(idx)
        passes = local.tensor_split(max(1, min(math.ceil(len(local) / batch_size), len(local) // 2)))
        optimizer.zero_grad(set_to_none=True)
        if len(passes) == 1:  # the usual step: one forward and backward, its loss already the step's mean
            loss = loss_fn(model(x[local]), y[local])
            loss.backward()
            step_loss = loss.detach()
        else:
            summed = torch.zeros((), device=x.device)
            for i, part in enumerate(passes):
                # DDP averages gradients over the ranks once per optimizer step, on the last pass.
                quiet = model.no_sync() if parallel is not None and i < len(passes) - 1 else nullcontext()
                with quiet:
                    logits = model(x[part])  # (b, K)
                    loss = loss_fn(logits, y[part])
                    (loss * (len(part) / len(local))).backward()
                summed += loss.detach() * len(part)
            step_loss = summed / len(local)
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
        sizes.append(len(local))
        seen += len(local)
        guard.ctx.samples.seen += len(idx)  # every rank's samples: counted once, on the rank that accounts for the trial
        if len(losses) == 256:
            total += _weighted_sum(losses, sizes)
        guard.check_step(step, step_loss, lr)
    total += _weighted_sum(losses, sizes)
    if parallel is not None:
        total, seen = parallel.total(torch.tensor([float(total), float(seen)])).tolist()  # the mean over every rank's samples
    return float(total) / max(seen, 1)


def _weighted_sum(losses: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Sum of each loss times its size, and both lists emptied."""
    if not losses:
        return torch.zeros(())
    out = (torch.stack(losses).float() * torch.tensor(sizes, dtype=torch.float32, device=losses[0].device)).sum()
    losses.clear()
    sizes.clear()
    return out


class Evaluation(NamedTuple):
    """A model's mean loss and accuracy on a set, and its confusion counts (rows: true classes; a tensor,
    turned into lists once, for the final model only)."""

    loss: float
    accuracy: float
    confusion: torch.Tensor


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, num_classes: int, chunk: int = 1024,
) -> Evaluation:
    """``model`` on ``(x, y)``: the confusion counts come from the same forward pass (the last epoch's are the trial's)."""
    model.eval()
    loss_sum = 0.0
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=x.device)
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])  # (B, K)
        target = y[start : start + chunk]
        loss_sum += float(loss_fn(logits, target)) * len(target)
        counts += torch.bincount(target * num_classes + logits.argmax(dim=1), minlength=num_classes * num_classes)
    confusion = counts.view(num_classes, num_classes)
    return Evaluation(loss_sum / len(x), int(confusion.diagonal().sum()) / len(x), confusion)


def make_loss(head: str, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on logits; for a sigmoid head, per-class binary cross-entropy on the same logits."""
    if head == "sigmoid":
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, F.one_hot(y, num_classes).to(logits.dtype))
    return F.cross_entropy


# (parameters, spec, fused) -> optimizer, one per name of models.spec.choices.OPTIMIZERS. ``fused``: one kernel
# updates every parameter tensor instead of a loop of small ops per tensor (:func:`make_optimizer` decides).
OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], OptimSpec, bool], torch.optim.Optimizer]] = {
    "sgd": lambda p, o, fused: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay, fused=fused),
    "momentum": lambda p, o, fused: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay, momentum=_or(o.momentum, 0.9), fused=fused),
    "nesterov": lambda p, o, fused: torch.optim.SGD(
        p, lr=o.lr, weight_decay=o.weight_decay, momentum=_or(o.momentum, 0.9), nesterov=True, fused=fused,
    ),
    "adam": lambda p, o, fused: torch.optim.Adam(p, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas or (0.9, 0.999), fused=fused),
    "adamw": lambda p, o, fused: torch.optim.AdamW(p, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas or (0.9, 0.999), fused=fused),
    # RMSprop has no fused kernel: it ignores ``fused``.
    "rmsprop": lambda p, o, fused: torch.optim.RMSprop(p, lr=o.lr, weight_decay=o.weight_decay, momentum=_or(o.momentum, 0.0)),
}
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def make_optimizer(params: Any, optim: OptimSpec) -> torch.optim.Optimizer:
    """The spec's optimizer over ``params``, with PyTorch's fused kernel where it has one for them.

    On the CPU torch otherwise picks a loop of small ops per parameter tensor; the fused step is
    faster (docs/performance.md, "Fused optimizers"). Same update rule: the fused kernel computes it
    in one pass.
    """
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES and not p.is_sparse for p in params)
    return lookup(OPTIMIZERS, optim.optimizer, "optimizer")(params, optim, fused)


# The schedule after warm-up, stepped once per optimizer step, one per name of models.spec.choices.SCHEDULES:
# (optimizer, spec, steps per epoch, its steps) -> scheduler.
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, OptimSpec, int, int], LRScheduler]] = {
    "none": lambda opt, o, per_epoch, steps: LambdaLR(opt, lambda step: 1.0),
    "step": lambda opt, o, per_epoch, steps: StepLR(opt, step_size=o.step_size * per_epoch, gamma=o.gamma),
    "exponential": lambda opt, o, per_epoch, steps: StepLR(opt, step_size=per_epoch, gamma=o.gamma),  # gamma once per epoch
    "cosine": lambda opt, o, per_epoch, steps: CosineAnnealingLR(opt, T_max=steps),  # to 0 at the last step
    # Its own warm-up: the spec refuses warmup_epochs with it, so it always spans every step.
    "onecycle": lambda opt, o, per_epoch, steps: OneCycleLR(opt, max_lr=o.lr, total_steps=steps),
}


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSpec, steps_per_epoch: int) -> LRScheduler:
    """A per-step scheduler: linear warm-up from lr/100 over ``warmup_epochs``, then the spec's schedule."""
    total_steps = optim.epochs * steps_per_epoch
    warmup_steps = optim.warmup_epochs * steps_per_epoch
    make_schedule = lookup(SCHEDULES, optim.schedule, "schedule")
    if not warmup_steps:
        return make_schedule(optimizer, optim, steps_per_epoch, total_steps)
    warmup = LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup_steps)
    decay = make_schedule(optimizer, optim, steps_per_epoch, total_steps - warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


class _Guard:
    """Cooperative stops: the lease (still this worker's?) and the cancel flag every N steps and each
    epoch, the lease again before an epoch is logged, the time limit likewise, and the divergence
    detector on every step's loss. In a data-parallel trial rank 0 decides all but divergence and
    tells the other ranks at each check; divergence every rank judges alike."""

    def __init__(self, spec: TrialSpec, ctx: TrainingContext):
        self.limit_s = spec.time_limit_s
        self.ctx = ctx
        reduce = None if ctx.parallel is None else ctx.parallel.mean
        self.divergence = DivergenceDetector(spec.divergence, ctx.check_every_steps, reduce)

    def check_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.divergence.observe(loss, lr)
        if step and step % self.ctx.check_every_steps == 0:
            self._check(f"at step {step}")

    def check_epoch(self, epoch: int, stop: TrialStopped | None = None) -> None:
        self._check(f"after epoch {epoch}", stop)

    def check_owner(self, epoch: int) -> None:
        """Before epoch ``epoch`` is logged and checkpointed: raise Superseded if this worker lost the trial."""
        self._raise(superseded(self.ctx, f"after epoch {epoch}") if self._decides() else None)

    def _check(self, where: str, stop: TrialStopped | None = None) -> None:
        if stop is None and self._decides():
            stop = requested_stop(self.ctx, self.limit_s, where)
        self._raise(stop)

    def _decides(self) -> bool:
        return self.ctx.parallel is None or self.ctx.parallel.rank == 0

    def _raise(self, stop: TrialStopped | None) -> None:
        if self.ctx.parallel is not None:
            stop = self.ctx.parallel.agree(stop)
        if stop is not None:
            raise stop


def requested_stop(ctx: TrainingContext, limit_s: float | None, where: str) -> TrialStopped | None:
    """The stop the worker asks for at ``where`` (its lease lost, its cancel flag raised, ``limit_s`` passed), or None."""
    lost = superseded(ctx, where)
    if lost is not None:
        return lost
    if ctx.should_cancel():
        return Cancelled(f"cancelled on request, {where}")
    elapsed = time.monotonic() - ctx.started
    if limit_s is not None and elapsed > limit_s:
        return TimedOut(f"ran {elapsed:.1f}s, past its time_limit_s of {limit_s:g}s, {where}")
    return None


def superseded(ctx: TrainingContext, where: str) -> Superseded | None:
    """Superseded when this worker no longer holds the trial (``ctx.still_owner``), else None."""
    return None if ctx.still_owner() else Superseded(f"this worker lost the trial's lease {where}; another worker resumes it")


def save_checkpoint(
    path: Path | None, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
    history: list[dict[str, float]], divergence: DivergenceDetector, stamps: list[int] | None = None,
) -> None:
    """Write the state after ``epoch`` atomically, so a crash mid-write leaves the previous one."""
    if path is None:
        return
    _write_checkpoint(path, _checkpoint_state(epoch, model, optimizer, scheduler, history, divergence, stamps))


class CheckpointWriter:
    """A trial's checkpoints, written on a process-wide thread while training goes on; one in flight at most.

    :meth:`save` snapshots the state (tensors cloned: the next epoch changes them) and returns; the
    write ends with an atomic rename, as :func:`save_checkpoint`'s, and the next save (or leaving the
    block) waits for it and raises its error. A state over ``SNAPSHOT_LIMIT_BYTES`` is written at once
    instead: copying a large model costs more than its write. Leaving the block waits for the write in
    flight, so none lands after the delivery ended and removed the file; while an exception leaves it,
    a failed write is logged, not raised over that exception.

    ``base`` is the trial's checkpoint name and ``fence`` this delivery's: it writes
    ``fenced_checkpoint(base, fence)`` only, asks ``still_owner`` right before each write, and removes
    the lower fences' files after its first write.
    """

    SNAPSHOT_LIMIT_BYTES = 256 * 2**20
    _pool: ThreadPoolExecutor | None = None  # per process: a forked child makes its own (forget_pool)

    def __init__(self, base: Path | None, still_owner: Callable[[], bool] = lambda: True, fence: int = 0):
        self.base, self.fence, self.still_owner = base, fence, still_owner
        self.path = None if base is None else fenced_checkpoint(base, fence)
        self._pending: Future | None = None
        self._written = False

    def __enter__(self) -> CheckpointWriter:
        return self

    @classmethod
    def forget_pool(cls) -> None:
        """After a fork, in the child: the parent's pool came without its thread (its writes would never run)."""
        cls._pool = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise
            log.warning("checkpoint %s: the last write failed while the trial stopped", self.path, exc_info=True)

    def save(
        self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
        history: list[dict[str, float]], divergence: DivergenceDetector, stamps: list[int] | None = None,
    ) -> Future | None:
        """Snapshot the state after ``epoch`` and write it on the writer's thread; the write (None: none is pending)."""
        if self.path is None:
            return None
        self.wait()
        state = _checkpoint_state(epoch, model, optimizer, scheduler, history, divergence, stamps)
        if _tensor_bytes(state) > self.SNAPSHOT_LIMIT_BYTES:
            self._write(state)
            return None
        if CheckpointWriter._pool is None:  # made in the process that trains (after a prefork worker forked)
            CheckpointWriter._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = CheckpointWriter._pool.submit(self._write, _snapshot(state))
        return self._pending

    def _write(self, state: dict[str, Any]) -> None:
        # Asked again when written: a worker paused since the epoch ended may have lost the trial to another. Its
        # file would not replace the other's (a lower fence, which no one reads), but it need not be written at all.
        if not self.still_owner():
            return
        _write_checkpoint(self.path, state)  # type: ignore[arg-type] - save() returns early without a path
        if not self._written and self.fence:
            try:
                remove_checkpoints(self.base, below=self.fence)  # type: ignore[arg-type] - a path was given
            except OSError:  # no reader takes them over this one's; the ending, or the reconciler's sweep, deletes them
                log.warning("checkpoint %s: the earlier holders' files could not be removed", self.path, exc_info=True)
        self._written = True

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _checkpoint_state(
    epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, history: list[dict[str, float]], divergence: DivergenceDetector,
    stamps: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "history": history, "stamps": list(stamps or []), "divergence": divergence.state_dict(),
    }


def _snapshot(state: Any) -> Any:
    """A copy of a checkpoint's state that training cannot change: tensors cloned, containers rebuilt.

    Cheaper than ``copy.deepcopy`` (docs/performance.md, "Checkpoint snapshots"): deepcopy's
    per-tensor bookkeeping, not the bytes, was the cost, paid on the training path every epoch.
    """
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if type(state) in (dict, OrderedDict):  # a module's state_dict is an OrderedDict with its load metadata
        copied = type(state)((k, _snapshot(v)) for k, v in state.items())
        torch_state.copy_load_metadata(state, copied)
        return copied
    if type(state) in (list, tuple):
        return type(state)(_snapshot(v) for v in state)
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    return copy.deepcopy(state)


def _tensor_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` whole or not at all: a file of its own first (a unique name: workers on other
    hosts share the volume, and their pids), on disk (fsync) before it takes the checkpoint's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # the rename itself survives a host crash


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a file system that cannot open folders: the rename is as durable as it makes it
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fenced_checkpoint(base: Path, fence: int) -> Path:
    """The file the holder of lease fence ``fence`` writes the checkpoints of ``base`` (``<run>.pt``) to: ``<run>.f<fence>.pt``."""
    return base if fence == 0 else base.with_name(f"{base.stem}.f{fence}{base.suffix}")


_FENCED = re.compile(r"(?P<run>.+?)(?:\.f(?P<fence>\d+))?\.pt")
_TEMPORARY = re.compile(r"(?P<checkpoint>.+)\.[0-9a-f]{32}\.tmp")  # _write_checkpoint's file before its rename


def checkpoint_run(name: str, temporary: bool = False) -> tuple[str, int] | None:
    """The run and fence of a checkpoint file's ``name`` (``<run>.pt`` is fence 0); None for any other file.

    ``temporary``: of a temporary file's name instead (``<checkpoint>.<hex>.tmp``), the checkpoint it was to become.
    """
    if temporary:
        written = _TEMPORARY.fullmatch(name)
        if written is None:
            return None
        name = written["checkpoint"]
    match = _FENCED.fullmatch(name)
    return None if match is None else (match["run"], int(match["fence"] or 0))


def checkpoint_files(base: Path) -> list[tuple[int, Path]]:
    """Every fence's checkpoint of ``base`` on disk, the highest fence first (the one to resume from)."""
    if not base.parent.is_dir():
        return []
    found = []
    for path in base.parent.glob(f"{glob.escape(base.stem)}*{base.suffix}"):
        parsed = checkpoint_run(path.name)
        if parsed is not None and parsed[0] == base.stem:
            found.append((parsed[1], path))
    return sorted(found, key=lambda fp: fp[0], reverse=True)


def remove_checkpoints(base: Path, below: int | None = None) -> list[Path]:
    """Delete the checkpoints of ``base`` (those of fences below ``below`` only, when given); the files deleted."""
    removed = []
    for fence, path in checkpoint_files(base):
        if below is None or fence < below:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class UnreadableCheckpoint(WorkerError):
    """The checkpoint exists but cannot be loaded (torn by a crash mid-write on a file system without atomic rename,
    damaged, or not a checkpoint of this trial): it is lost, and the trial trains again from its first epoch."""


def restore_checkpoint(
    path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, history: list[dict[str, float]],
    divergence: DivergenceDetector, stamps: list[int] | None = None,
) -> int:
    """Load the last checkpoint of ``path`` (the highest fence's file) into the given objects (``stamps``: its epochs' end times,
    when it has them); the epoch it ended (0 when none).

    Raises UnreadableCheckpoint when the file is there but cannot be loaded; the objects may then hold part of it.
    """
    files = [] if path is None else checkpoint_files(path)
    if not files:
        return 0
    path = files[0][1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "divergence" in state:
            # The first loss stays the untrained one: judged against a resumed, low loss, noise would look like a blow-up.
            divergence.load_state_dict(state["divergence"])
        epoch, loaded = int(state["epoch"]), list(state["history"])
        kept = [int(t) for t in state.get("stamps", [])]  # none in a checkpoint written before they were kept
    except Exception as exc:  # whatever is wrong with the file, it is no checkpoint to resume from
        raise UnreadableCheckpoint(f"checkpoint {path.name} could not be read ({type(exc).__name__}: {str(exc)[:300]}); trained again from epoch 1") from exc
    history.extend(loaded)
    if stamps is not None:
        stamps.extend(kept)
    return epoch


os.register_at_fork(after_in_child=CheckpointWriter.forget_pool)
