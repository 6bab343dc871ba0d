"""The learning-rate range test: its spec, and the rules that read a suggestion off its curve.

A range test trains a trial's network for ``steps`` optimizer steps while the learning rate grows
exponentially from ``start_lr`` to ``end_lr`` (the same ratio every step), recording each step's
loss. It stops early once the loss blows up: a NaN/Inf loss, or a smoothed loss (bias-corrected
exponential moving average, weight ``smoothing``) above ``blowup_factor`` times its lowest value.

The rules (docs/tuning.md shows a real curve):

- the curve is read through a **centred** moving average of the raw losses (``window`` steps, odd),
  which, unlike the moving average that decides the early stop, does not lag behind the LR;
- **largest stable LR** = the LR at the minimum of that centred curve: past it the loss rises;
- **suggested LR** = largest stable LR / 3: Smith's rule for the base of a cyclical schedule ("a
  third or a quarter of the maximum"), well inside the stable region, where the loss still falls
  fast. (fastai's "minimum / 10" was measured too and trains slower on short budgets: docs/tuning.md.)

A curve whose minimum is its first point never fell: no suggestion (the test fails with a reason).
A curve whose minimum is its last point never rose: the largest stable LR is at least ``end_lr``.
:func:`lr_search_range` turns a result's two LRs into the range a study searches, one decade either side of
the suggestion (capped at the largest stable LR). This module must not import torch: the API and studies use it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, Field, model_validator

from models.spec.base import Spec
from models.spec.errors import ConvtuneError
from models.spec.trial import TrialSpec

__all__ = [
    "SUGGESTION_DIVISOR",
    "LrAutoSpec",
    "LrRangeResult",
    "LrRangeSpec",
    "NoSuggestion",
    "RangeTestSettings",
    "analyse_range",
    "lr_search_range",
]

SUGGESTION_DIVISOR = 3.0


class RangeTestSettings(Spec):
    """How a range test sweeps the learning rate and when it stops."""

    start_lr: float = Field(default=1e-6, gt=0.0, le=1.0, description="The LR of the first step.")
    end_lr: float = Field(default=10.0, gt=0.0, le=1000.0, description="The LR of the last step, if the loss has not blown up by then.")
    steps: int = Field(default=200, ge=20, le=5000, description="Optimizer steps from start_lr to end_lr.")
    smoothing: float = Field(default=0.9, ge=0.0, lt=1.0, description="Weight of the past in the moving average that decides the early stop.")
    blowup_factor: float = Field(default=4.0, ge=1.5, le=1000.0, description="Stop once the smoothed loss exceeds this multiple of its lowest value.")
    window: int = Field(default=0, ge=0, le=501, description="Width of the centred average the rules read; 0: steps / 20, odd, at least 5.")

    @model_validator(mode="after")
    def _range_grows(self) -> RangeTestSettings:
        if self.end_lr <= self.start_lr * 10:
            raise ValueError(f"end_lr ({self.end_lr:g}) must be at least 10x start_lr ({self.start_lr:g}) for the test to span a range")
        return self

    def lr_at(self, step: int) -> float:
        """The LR of step ``step`` (0-based): start_lr x (end_lr / start_lr) ** (step / (steps - 1))."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))

    def centred_window(self) -> int:
        w = self.window or max(5, self.steps // 20)
        return w if w % 2 else w + 1


class LrRangeSpec(RangeTestSettings):
    """A learning-rate range test of ``trial``'s network, optimizer, batch size and data.

    The trial's ``optim.lr``, schedule and epochs are not used: the test sets the LR itself.
    """

    trial: TrialSpec = Field(default_factory=TrialSpec)


class LrAutoSpec(RangeTestSettings):
    """A study's ``lr_auto``: one range test of the study's base trial before its first trial, then
    ``optim.lr`` searched log-uniformly in :func:`lr_search_range` of its result."""

    decades: float = Field(default=1.0, gt=0.0, le=3.0, description="How far, in decades, either side of the suggested LR the search goes.")


class NoSuggestion(ConvtuneError, ValueError):
    """The curve does not allow a suggestion (the loss never fell); the message says what to change."""


class LrRangeResult(BaseModel):
    """What a range test found, with the curve it read it from."""

    suggested_lr: float = Field(description="Largest stable LR / 3.")
    largest_stable_lr: float = Field(description="The LR at the minimum of the centred-average loss.")
    min_loss: float = Field(description="The centred-average loss at that minimum.")
    steps_done: int
    stopped_early: bool = Field(description="Whether the loss blew up before end_lr.")
    stop_reason: str
    never_rose: bool = Field(default=False, description="The loss still fell at end_lr: the largest stable LR is at least end_lr.")
    lrs: list[float] = Field(default_factory=list)
    losses: list[float] = Field(default_factory=list, description="The raw loss of each step.")
    smoothed: list[float] = Field(default_factory=list, description="The centred average the rules read (null where not finite).")


def centred_average(values: Sequence[float], window: int) -> list[float]:
    """Average of each value with its (window - 1) / 2 neighbours each side, fewer at the ends."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else math.inf)
    return out


def analyse_range(spec: LrRangeSpec, lrs: Sequence[float], losses: Sequence[float], stop_reason: str) -> LrRangeResult:
    """Apply the rules to a recorded curve; raises NoSuggestion when the loss never fell."""
    if len(losses) < 3:
        raise NoSuggestion(f"the loss blew up after {len(losses)} step(s) ({stop_reason}): lower start_lr")
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    last = finite[-1] + 1 if finite else 0
    smooth = centred_average(losses[:last], spec.centred_window())
    best = min(range(len(smooth)), key=smooth.__getitem__)
    if best == 0 or smooth[best] >= smooth[0]:
        raise NoSuggestion(
            f"the loss never fell between {lrs[0]:.2g} and {lrs[len(smooth) - 1]:.2g} ({stop_reason}): lower start_lr, "
            "or check the data and the model"
        )
    stopped_early = len(losses) < spec.steps
    never_rose = best == len(smooth) - 1 and not stopped_early
    largest = lrs[best]
    return LrRangeResult(
        suggested_lr=largest / SUGGESTION_DIVISOR, largest_stable_lr=largest, min_loss=smooth[best], steps_done=len(losses),
        stopped_early=stopped_early, stop_reason=stop_reason, never_rose=never_rose, lrs=list(lrs), losses=list(losses),
        smoothed=smooth + [math.inf] * (len(losses) - len(smooth)),
    )


def lr_search_range(suggested_lr: float, largest_stable_lr: float, decades: float = 1.0) -> tuple[float, float]:
    """The log-uniform LR range a study searches: ``decades`` either side of the suggested LR, capped.

    With the default: (suggested / 10, largest stable), about 1.5 decades below the largest stable
    LR and never above it, where a trial may still diverge.
    """
    return suggested_lr / 10**decades, min(suggested_lr * 10**decades, largest_stable_lr)
