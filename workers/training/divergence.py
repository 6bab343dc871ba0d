"""Divergence detection: end a trial whose loss blew up, and say where and why.

The training loop hands every step's loss to :meth:`DivergenceDetector.observe` as a tensor; the
detector judges them in batches of ``check_every`` steps (one host-device sync per batch, not per
step) and at every epoch end. Three rules, each with its threshold in
:class:`models.spec.trial.DivergenceSpec` (documented in docs/tuning.md):

- **non-finite**: a step loss that is NaN or infinite;
- **rise**: the smoothed loss (a bias-corrected exponential moving average of the step losses)
  above ``rise_factor`` times the first step's loss, judged from step ``min_steps`` on;
- **stall**: an epoch-mean training loss that stayed above ``(1 - min_progress)`` times the first
  step's loss for ``stall_epochs`` epochs in a row.

Each raises :class:`workers.training.outcomes.Diverged` with the step, epoch, value and learning rate seen.
In data-parallel training ``reduce`` averages the losses over the processes first, so every
process reaches the same verdict at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from models.spec.trial import DivergenceSpec
from workers.training.outcomes import Diverged

__all__ = ["DivergenceDetector"]

TOO_HIGH = "the learning rate may be too high"


class DivergenceDetector:
    """Watches the step losses of one trial; raises Diverged when a rule fires."""

    def __init__(
        self, spec: DivergenceSpec, check_every: int = 10,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.spec = spec
        self.check_every = max(1, check_every)
        self.reduce = reduce
        self.first_loss: float | None = None
        self.step = 0  # steps judged so far, over all epochs of this run
        self.epoch = 1
        self.epoch_step = 0
        self._ema = 0.0
        self._ema_weight = 0.0
        self._pending: list[torch.Tensor] = []
        self._pending_lrs: list[float] = []
        self._stalled: list[float] = []

    def state_dict(self) -> dict[str, float | int | list[float] | None]:
        """What a checkpoint keeps (taken after :meth:`end_epoch`, so nothing is pending)."""
        return {"first_loss": self.first_loss, "step": self.step, "ema": self._ema, "ema_weight": self._ema_weight, "stalled": list(self._stalled)}

    def load_state_dict(self, state: dict) -> None:
        self.first_loss, self.step = state["first_loss"], int(state["step"])
        self._ema, self._ema_weight, self._stalled = float(state["ema"]), float(state["ema_weight"]), list(state["stalled"])

    def start_epoch(self, epoch: int) -> None:
        """Called before the first step of ``epoch``, so reasons can name it."""
        self.epoch, self.epoch_step = epoch, 0

    def observe(self, loss: torch.Tensor, lr: float) -> None:
        """Queue one step's loss (computed at ``lr``); judge the queue every ``check_every`` steps."""
        if not self.spec.enabled:
            return  # every rank has the same spec: none of them enters the collective in flush
        self._pending.append(loss.detach().float().reshape(()))
        self._pending_lrs.append(lr)
        if len(self._pending) >= self.check_every:
            self.flush()

    def flush(self) -> None:
        """Judge the queued losses now (one sync with the device)."""
        if not self._pending:
            return
        values = torch.stack(self._pending)
        if self.reduce is not None:
            values = self.reduce(values)
        lrs = self._pending_lrs
        self._pending, self._pending_lrs = [], []
        for value, lr in zip(values.tolist(), lrs):
            self._judge(value, lr)

    def end_epoch(self, epoch: int, mean_loss: float, lr: float) -> None:
        """Called after the last step of ``epoch`` with its mean training loss: the stall rule."""
        self.flush()
        spec = self.spec
        if not spec.enabled or spec.stall_epochs is None or self.first_loss is None:
            return
        if not math.isfinite(mean_loss):
            raise Diverged(f"the mean training loss of epoch {epoch} is {mean_loss} at lr {lr:.3g}; {TOO_HIGH}")
        bar = (1.0 - spec.min_progress) * self.first_loss
        self._stalled = self._stalled + [mean_loss] if mean_loss > bar else []
        if len(self._stalled) >= spec.stall_epochs:
            means = ", ".join(f"{m:.4g}" for m in self._stalled)
            raise Diverged(
                f"no progress for {len(self._stalled)} epochs (epochs {epoch - len(self._stalled) + 1}-{epoch}): "
                f"mean training loss {means}, never below {bar:.4g} ({spec.min_progress:.0%} under the first loss "
                f"{self.first_loss:.4g}), at lr {lr:.3g}; {TOO_HIGH} (or far too low)"
            )

    def _judge(self, value: float, lr: float) -> None:
        self.step += 1
        self.epoch_step += 1
        where = f"step {self.step} (epoch {self.epoch}, step {self.epoch_step} of the epoch) at lr {lr:.3g}"
        if not math.isfinite(value):
            raise Diverged(f"the training loss became {value} at {where}; {TOO_HIGH}")
        if self.first_loss is None:
            self.first_loss = value
        beta = self.spec.smoothing
        self._ema = beta * self._ema + (1.0 - beta) * value
        self._ema_weight = beta * self._ema_weight + (1.0 - beta)
        smoothed = self._ema / self._ema_weight
        limit = self.spec.rise_factor * self.first_loss
        if self.step >= self.spec.min_steps and smoothed > limit:
            raise Diverged(
                f"the smoothed training loss rose to {smoothed:.4g}, above {self.spec.rise_factor:g}x its first value "
                f"{self.first_loss:.4g}, at {where}; {TOO_HIGH}"
            )
