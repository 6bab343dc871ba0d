"""The range test's rules on given curves, and the tuning fields of the trial spec."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from models.spec.trial import TrialSpec, flatten_params
from models.spec.tuning import LrRangeSpec, NoSuggestion, analyse_range, centred_average, lr_search_range


def valley(spec: LrRangeSpec, bottom_step: int, blow_up_at: int | None = None) -> tuple[list[float], list[float]]:
    """A loss that falls to its bottom at ``bottom_step``, then rises (and blows up)."""
    lrs = [spec.lr_at(i) for i in range(spec.steps if blow_up_at is None else blow_up_at)]
    losses = [2.3 - 2.0 * min(i, bottom_step) / bottom_step + 0.05 * max(0, i - bottom_step) for i in range(len(lrs))]
    if blow_up_at is not None:
        losses[-1] = float("nan")
    return lrs, losses


def test_lr_grows_by_the_same_ratio_every_step():
    spec = LrRangeSpec(start_lr=1e-6, end_lr=1.0, steps=101)
    assert spec.lr_at(0) == pytest.approx(1e-6) and spec.lr_at(100) == pytest.approx(1.0) and spec.lr_at(50) == pytest.approx(1e-3)


def test_largest_stable_is_the_minimum_and_the_suggestion_a_third_of_it():
    spec = LrRangeSpec(steps=100)
    lrs, losses = valley(spec, bottom_step=60, blow_up_at=90)
    result = analyse_range(spec, lrs, losses, "the loss became nan")
    assert result.largest_stable_lr == pytest.approx(lrs[60])
    assert result.suggested_lr == pytest.approx(lrs[60] / 3)
    assert result.stopped_early and not result.never_rose and result.steps_done == 90
    assert math.isinf(result.smoothed[-1])  # the non-finite tail is not averaged into the curve


def test_the_centred_average_does_not_lag_the_minimum():
    noisy = [abs(i - 40) + (3 if i % 2 else -3) for i in range(81)]
    smooth = centred_average(noisy, 9)
    assert min(range(81), key=smooth.__getitem__) == 40


def test_a_loss_that_never_fell_gives_no_suggestion():
    spec = LrRangeSpec(steps=50)
    lrs = [spec.lr_at(i) for i in range(50)]
    with pytest.raises(NoSuggestion, match="never fell"):
        analyse_range(spec, lrs, [2.3 + 0.01 * i for i in range(50)], "reached end_lr")


def test_a_loss_that_never_rose_says_so():
    spec = LrRangeSpec(steps=50)
    lrs, losses = valley(spec, bottom_step=49)
    result = analyse_range(spec, lrs, losses, "reached end_lr")
    assert result.never_rose and result.largest_stable_lr == pytest.approx(spec.end_lr)


def test_a_blow_up_in_the_first_steps_asks_for_a_lower_start():
    spec = LrRangeSpec(steps=50)
    with pytest.raises(NoSuggestion, match="lower start_lr"):
        analyse_range(spec, [spec.lr_at(0), spec.lr_at(1)], [2.3, float("nan")], "the loss became nan")


def test_search_range_is_a_decade_each_side_capped_at_the_largest_stable():
    assert lr_search_range(0.1, 0.3) == pytest.approx((0.01, 0.3))
    assert lr_search_range(0.1, 0.3, decades=0.25) == pytest.approx((0.1 / 10**0.25, 0.1 * 10**0.25))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"start_lr": 1e-3, "end_lr": 5e-3}, "at least 10x start_lr"),
        ({"steps": 5}, "steps"),
        ({"blowup_factor": 1.0}, "blowup_factor"),
        ({"trial": {"optim": {"lr": 0}}}, "trial.optim.lr"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_range_spec_is_validated(body: dict, field: str):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        LrRangeSpec.model_validate(body)


def test_trial_spec_tuning_fields_have_defaults_that_change_nothing():
    spec = TrialSpec()
    assert spec.optim.batch_size == 32 and spec.optim.effective_batch_size is None and spec.optim.lr_scaling == "none"
    assert spec.devices == 1 and spec.divergence.enabled
    params = flatten_params(TrialSpec.model_validate({"optim": {"batch_size": "auto"}}))
    assert params["optim.batch_size"] == "auto" and params["divergence.rise_factor"] == "4.0"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"optim": {"batch_size": 0}}, "batch_size must be 'auto' or an integer"),
        ({"optim": {"batch_size": "big"}}, "batch_size"),
        ({"optim": {"batch_size": 32, "effective_batch_size": 48}}, "multiple of batch_size x devices"),
        ({"devices": 0}, "devices"),
        ({"divergence": {"rise_factor": 1.0}}, "rise_factor"),
        ({"optim": {"lr_scaling": "cubic"}}, "lr_scaling"),
    ],
)
def test_trial_spec_tuning_fields_are_validated(body: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        TrialSpec.model_validate(body)
