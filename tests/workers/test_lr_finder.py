"""The LR range test on real (tiny, CPU) training: its suggestion trains, 10x its largest stable LR diverges."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import torch

from models.spec.trial import TrialSpec
from models.spec.tuning import LrRangeSpec, analyse_range, lr_search_range
from tests.workers.trackers import ListTracker
from workers.training.outcomes import Cancelled, Diverged
from workers.training.range_test import range_test
from workers.training.train import TrainingContext, run_trial
from workers.trial.figures import range_test_svg

CPU = torch.device("cpu")
SVG = "{http://www.w3.org/2000/svg}"

# SGD with momentum and batch norm, the setting of Smith's range test. (With Adam and batch norm the
# net is nearly scale-invariant: 10x the largest stable LR still trains; docs/tuning.md.)
TRIAL = TrialSpec.model_validate({
    "model": {"channels": [16, 32], "convs_per_stage": 1},
    "optim": {"optimizer": "momentum", "batch_size": 64, "epochs": 8},
    "data": {"name": "digits"},
})


@pytest.fixture(scope="module")
def found() -> tuple[LrRangeSpec, Any]:
    spec = LrRangeSpec(trial=TRIAL)
    curve, reason = range_test(spec, TrainingContext(device=CPU))
    return spec, analyse_range(spec, curve.lrs, curve.losses, reason)


def at_lr(lr: float) -> TrialSpec:
    return TRIAL.model_copy(update={"optim": TRIAL.optim.model_copy(update={"lr": lr})})


def test_range_test_grows_the_lr_exponentially_and_reads_both_lrs(found):
    spec, result = found
    assert result.lrs[0] == pytest.approx(spec.start_lr)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))
    assert result.suggested_lr == pytest.approx(result.largest_stable_lr / 3)
    assert spec.start_lr < result.suggested_lr < result.largest_stable_lr < spec.end_lr
    i = result.lrs.index(result.largest_stable_lr)
    assert result.smoothed[i] == min(s for s in result.smoothed if math.isfinite(s))
    assert result.smoothed[i] < 0.5 * result.smoothed[0]  # the loss really fell before the minimum


def test_training_at_the_suggested_lr_reaches_095(found):
    _, result = found
    trained = run_trial(at_lr(result.suggested_lr), ListTracker(), TrainingContext(device=CPU))
    assert trained.best_val_accuracy >= 0.95, (result.suggested_lr, trained.history)


def test_training_at_ten_times_the_largest_stable_lr_is_detected_as_diverged(found):
    _, result = found
    tracker = ListTracker()
    with pytest.raises(Diverged, match="the learning rate may be too high") as caught:
        run_trial(at_lr(10 * result.largest_stable_lr), tracker, TrainingContext(device=CPU))
    assert f"at lr {10 * result.largest_stable_lr:.3g}" in caught.value.reason
    assert len(tracker.epochs) < TRIAL.optim.epochs  # stopped early


def test_search_range_is_centred_on_the_suggestion_and_capped(found):
    _, result = found
    low, high = lr_search_range(result.suggested_lr, result.largest_stable_lr)
    assert low == pytest.approx(result.suggested_lr / 10) and high == pytest.approx(result.largest_stable_lr)


def test_range_test_stops_early_once_the_loss_blows_up():
    spec = LrRangeSpec(trial=TRIAL.model_copy(update={"model": TRIAL.model.model_copy(update={"norm": "none"}), "optim": TRIAL.optim.model_copy(update={"optimizer": "rmsprop"})}), steps=100)
    curve, reason = range_test(spec, TrainingContext(device=CPU))
    assert len(curve.losses) < 100 and ("passed 4x its lowest" in reason or "became" in reason)
    result = analyse_range(spec, curve.lrs, curve.losses, reason)
    assert result.stopped_early and result.largest_stable_lr < curve.lrs[-1]


def test_range_test_is_cancelled_cooperatively():
    calls: list[int] = []
    with pytest.raises(Cancelled, match="at step 10"):
        range_test(LrRangeSpec(trial=TRIAL, steps=50), TrainingContext(device=CPU, check_every_steps=10, should_cancel=lambda: bool(calls.append(1)) or True))


def test_curve_plot_marks_both_lrs(found):
    spec, result = found
    root = ET.fromstring(range_test_svg(spec, result))
    marks = {line.find(f"{SVG}title").text: float(line.get("x1")) for line in root.iter(f"{SVG}line") if line.find(f"{SVG}title") is not None}
    largest, suggested = f"largest stable LR {result.largest_stable_lr:.3g}", f"suggested LR {result.suggested_lr:.3g}"
    assert set(marks) == {largest, suggested}
    assert marks[suggested] < marks[largest]  # a third of it, to its left on the log axis
    raw, smoothed = (len(line.get("points").split()) for line in root.iter(f"{SVG}polyline"))
    assert raw == sum(math.isfinite(v) for v in result.losses) and 0 < smoothed <= len(result.losses)
