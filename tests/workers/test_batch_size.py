"""batch_size 'auto' (probed on real forward/backward passes), LR scaling and gradient accumulation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.nets.convnet import build_model
from models.spec.plan import InputInfo
from models.spec.trial import TrialSpec
from tests.workers.trackers import ListTracker
from workers.training.batching import BatchPlan, BatchTooLarge, MemoryProbe, largest_fitting, plan_batches
from workers.training.outcomes import classify
from workers.training.train import TrainingContext, make_loss, make_optimizer, run_trial

CPU = torch.device("cpu")
DIGITS = InputInfo(channels=1, height=8, width=8, num_classes=10)


def spec(devices: int = 1, **optim: Any) -> TrialSpec:
    return TrialSpec.model_validate({"model": {"channels": [16, 32], "convs_per_stage": 1}, "optim": {"lr": 0.01, "epochs": 2, **optim}, "devices": devices})


def test_largest_fitting_doubles_until_it_no_longer_fits():
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= 100

    assert largest_fitting(fits, upper=1024) == 64
    assert tried == [2, 4, 8, 16, 32, 64, 128]
    assert largest_fitting(lambda b: True, upper=48) == 32


def test_not_even_two_fitting_is_out_of_memory():
    with pytest.raises(BatchTooLarge) as caught:
        largest_fitting(lambda b: False, upper=64)
    assert classify(caught.value).outcome == "out_of_memory"


@pytest.mark.parametrize(
    ("optim", "devices", "expected"),
    [
        ({"batch_size": 32}, 1, (32, 1, 32, 0.01)),
        ({"batch_size": 16, "effective_batch_size": 128}, 2, (16, 4, 128, 0.01)),
        ({"batch_size": 16, "effective_batch_size": 128, "lr_scaling": "linear", "reference_batch_size": 32}, 1, (16, 8, 128, 0.04)),
        ({"batch_size": 64, "lr_scaling": "sqrt", "reference_batch_size": 16}, 1, (64, 1, 64, 0.02)),
        ({"batch_size": "auto"}, 1, (256, 1, 256, 0.01)),
        ({"batch_size": "auto", "effective_batch_size": 1000}, 1, (250, 4, 1000, 0.01)),
        ({"batch_size": "auto", "effective_batch_size": 100, "lr_scaling": "linear", "reference_batch_size": 50}, 1, (100, 1, 100, 0.02)),
    ],
)
def test_plan_batches(optim: dict, devices: int, expected: tuple):
    plan = plan_batches(spec(devices, **optim), train_size=1437, probe=lambda b: b <= 300)
    assert (plan.batch_size, plan.accumulate, plan.effective, plan.lr) == pytest.approx(expected)


def test_effective_batch_must_be_whole_passes():
    with pytest.raises(ValueError, match=r"multiple of batch_size x devices \(64\)"):
        spec(2, batch_size=32, effective_batch_size=96)


def _probe(limit: int) -> MemoryProbe:
    torch.manual_seed(0)
    x, y = torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))
    trial = spec()
    return MemoryProbe(lambda: build_model(trial.model, DIGITS), lambda m: make_optimizer(m.parameters(), trial.optim), make_loss("logits", 10), x, y, CPU, limit)


def test_cpu_probe_measures_a_peak_that_grows_with_the_batch():
    probe = _probe(limit=2**40)
    assert probe(16) and probe(128)
    assert probe.peaks[128] > 3 * probe.peaks[16] > 0


def test_cpu_probe_backs_off_to_the_largest_batch_under_the_memory_limit():
    measure = _probe(limit=2**40)
    measure(64), measure(128)
    limit = (measure.peaks[64] + measure.peaks[128]) // 2
    assert largest_fitting(_probe(limit), upper=1024) == 64


def test_probe_backs_off_on_an_out_of_memory_error():
    probe = _probe(limit=2**40)
    real_loss = probe.loss_fn

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(y) > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(logits, y)

    probe.loss_fn = loss_fn
    assert largest_fitting(probe, upper=1024) == 32


def test_auto_batch_on_real_training_reports_what_it_chose():
    told: list[BatchPlan] = []
    result = run_trial(spec(batch_size="auto"), ListTracker(), TrainingContext(device=CPU, cpu_memory_limit_bytes=12 * 2**20, on_setup=told.append))
    chosen = told[0].batch_size
    assert chosen in (64, 128, 256, 512) and chosen == result.batches.batch_size
    assert told[0].effective == chosen and "probed from 2 up to 1024" in told[0].note


def test_gradient_accumulation_follows_the_curve_of_the_large_batch():
    # Without batch norm (its statistics are per pass), 4 passes of 16 make the same steps as one of 64.
    def curve(**optim: Any) -> list[float]:
        trial = TrialSpec.model_validate({"model": {"channels": [8, 16], "convs_per_stage": 1, "norm": "group", "norm_groups": 4}, "optim": {"lr": 0.01, "epochs": 3, **optim}})
        tracker = ListTracker()
        run_trial(trial, tracker, TrainingContext(device=CPU))
        return [m["train_loss"] for _, m in tracker.epochs] + [m["val_loss"] for _, m in tracker.epochs]

    assert curve(batch_size=16, effective_batch_size=64) == pytest.approx(curve(batch_size=64), rel=1e-4)


def test_lr_scaling_is_applied_to_the_optimizer():
    tracker = ListTracker()
    trial = spec(batch_size=16, effective_batch_size=64, lr_scaling="linear", reference_batch_size=16)
    run_trial(trial, tracker, TrainingContext(device=CPU))
    assert tracker.epochs[0][1]["lr"] == pytest.approx(0.04)
