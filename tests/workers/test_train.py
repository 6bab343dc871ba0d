"""The training loop on real (tiny, CPU) training: accuracy, stops, resume, schedules, optimizers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from models.spec.choices import OPTIMIZERS as OPTIMIZER_NAMES
from models.spec.trial import OptimSpec, TrialSpec
from tests.workers.trackers import ListTracker
from workers.training.divergence import DivergenceDetector
from workers.training.outcomes import Cancelled, TimedOut
from workers.training.train import (
    SCHEDULES,
    TrainingContext,
    checkpoint_files,
    make_optimizer,
    make_scheduler,
    restore_checkpoint,
    run_trial,
    save_checkpoint,
)

CPU = torch.device("cpu")


def spec(**optim: Any) -> TrialSpec:
    return TrialSpec.model_validate({"model": {"channels": [16, 32]}, "optim": {"lr": 3e-3, "epochs": 3, **optim}})


def test_digits_reaches_090_validation_accuracy_in_a_few_cpu_epochs():
    tracker = ListTracker()
    result = run_trial(spec(epochs=4), tracker, TrainingContext(device=CPU))
    assert result.best_val_accuracy >= 0.90
    assert [e for e, _ in tracker.epochs] == [1, 2, 3, 4]
    assert set(tracker.epochs[0][1]) == {"train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second"}
    assert tracker.epochs[-1][1]["train_loss"] < tracker.epochs[0][1]["train_loss"]
    assert tracker.summary[-1]["layer"] == "head" and tracker.result is not None
    assert tracker.result[1].shape[0] == 2  # a batch > 1 keeps the exported model's batch dynamic


def test_same_seed_same_curve():
    a, b = ListTracker(), ListTracker()
    run_trial(spec(epochs=2), a, TrainingContext(device=CPU))
    run_trial(spec(epochs=2), b, TrainingContext(device=CPU))
    assert [m["val_loss"] for _, m in a.epochs] == pytest.approx([m["val_loss"] for _, m in b.epochs])


def test_cancel_flag_stops_within_the_check_interval():
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) >= 2

    # Checked at steps 5 and 10: the flag raised between them stops the trial at step 10.
    with pytest.raises(Cancelled, match="cancelled on request, at step 10"):
        run_trial(spec(epochs=50, batch_size=16), ListTracker(), TrainingContext(device=CPU, should_cancel=should_cancel, check_every_steps=5))


def test_time_limit_ends_the_trial_as_timeout():
    trial = spec(epochs=500).model_copy(update={"time_limit_s": 0.5})
    with pytest.raises(TimedOut, match="past its time_limit_s of 0.5s"):
        run_trial(trial, ListTracker(), TrainingContext(device=CPU))


def test_resumes_from_its_last_checkpoint(tmp_path: Path):
    checkpoint = tmp_path / "trial.pt"
    first = ListTracker()
    with pytest.raises(Cancelled):
        # Cancelled after the second epoch's check: the checkpoint holds epoch 2.
        epochs_seen = []
        run_trial(spec(epochs=4), first, TrainingContext(device=CPU, checkpoint_path=checkpoint, on_epoch_end=lambda e, m: epochs_seen.append(e), should_cancel=lambda: len(epochs_seen) >= 2, check_every_steps=10**6))
    assert [e for e, _ in first.epochs] == [1, 2] and checkpoint.exists()

    resumed, restored, later = ListTracker(), [], []
    result = run_trial(spec(epochs=4), resumed, TrainingContext(
        device=CPU, checkpoint_path=checkpoint, on_resume=restored.append, on_epoch_end=lambda e, m: later.append(e)))
    # A study's objective is told the restored epochs once, before the epochs this delivery trains (a best_epoch objective).
    assert restored == [[m for _, m in first.epochs]] and later == [3, 4]
    # The checkpoint's epochs are offered again, as the first attempt logged them (the tracker logs an epoch
    # the run lacks, e.g. one whose metrics were still on their way when the worker died); then 3 and 4.
    assert [e for e, _ in resumed.epochs] == [1, 2, 3, 4] and resumed.epochs[:2] == first.epochs
    # ... with the stamps the first attempt gave them: a metric both send is then one row in MLflow
    assert resumed.stamps[:2] == first.stamps and all(isinstance(t, int) for t in resumed.stamps)
    assert resumed.stamps == sorted(resumed.stamps)
    assert result.epochs_done == 4 and len(result.history) == 4
    assert resumed.summary == []  # logged by the first attempt only


def test_a_delivery_resumes_from_the_highest_fence_and_its_first_checkpoint_removes_the_earlier_ones(tmp_path: Path):
    base = tmp_path / "trial.pt"
    epochs_seen: list[int] = []
    with pytest.raises(Cancelled):  # the holder of fence 1 checkpoints epochs 1 and 2, then stops
        run_trial(spec(epochs=4), ListTracker(), TrainingContext(
            device=CPU, checkpoint_path=base, fence=1, on_epoch_end=lambda e, m: epochs_seen.append(e), should_cancel=lambda: len(epochs_seen) >= 2,
            check_every_steps=10**6,
        ))
    assert [(f, p.name) for f, p in checkpoint_files(base)] == [(1, "trial.f1.pt")] and not base.exists()

    resumed = ListTracker()
    result = run_trial(spec(epochs=4), resumed, TrainingContext(device=CPU, checkpoint_path=base, fence=2))
    assert [e for e, _ in resumed.epochs] == [1, 2, 3, 4] and result.epochs_done == 4  # epochs 1-2 from fence 1's file
    assert [f for f, _ in checkpoint_files(base)] == [2], "epoch 3's checkpoint, and fence 1's removed after it"


def test_sigmoid_head_trains_with_per_class_bce():
    trial = TrialSpec.model_validate({"model": {"channels": [16, 32], "head": "sigmoid"}, "optim": {"lr": 3e-3, "epochs": 3}})
    tracker = ListTracker()
    result = run_trial(trial, tracker, TrainingContext(device=CPU))
    assert result.best_val_accuracy >= 0.85
    model = tracker.result[0]
    probabilities = model.output_activation(model(torch.zeros(2, 1, 8, 8)))
    assert ((probabilities > 0) & (probabilities < 1)).all()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_is_built(name: str):
    optim = OptimSpec(optimizer=name, lr=0.01)
    optimizer = make_optimizer([torch.nn.Parameter(torch.ones(2))], optim)
    assert optimizer.param_groups[0]["lr"] == 0.01


def _lrs(optim: OptimSpec, steps_per_epoch: int = 2) -> list[float]:
    param = torch.nn.Parameter(torch.ones(1))
    optimizer = make_optimizer([param], optim)
    scheduler = make_scheduler(optimizer, optim, steps_per_epoch)
    lrs = []
    for _ in range(optim.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_follow_their_definitions():
    assert _lrs(OptimSpec(lr=1.0, epochs=4)) == [1.0] * 8
    assert _lrs(OptimSpec(lr=1.0, epochs=4, schedule="step", step_size=2, gamma=0.5)) == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    assert _lrs(OptimSpec(lr=1.0, epochs=3, schedule="exponential", gamma=0.5)) == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    cosine = _lrs(OptimSpec(lr=1.0, epochs=4, schedule="cosine"))
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.05
    warm = _lrs(OptimSpec(lr=1.0, epochs=4, warmup_epochs=2))
    assert warm[0] == pytest.approx(0.01) and warm[:4] == sorted(warm[:4]) and warm[4:] == [1.0] * 4
    onecycle = _lrs(OptimSpec(lr=1.0, epochs=4, schedule="onecycle"))
    assert max(onecycle) == pytest.approx(1.0, rel=0.05) and onecycle[0] < 0.1 and onecycle[-1] < 0.01


def _formula(optim: OptimSpec, steps_per_epoch: int) -> list[float]:
    """The per-step LRs as the hand-written LambdaLR defined them before torch's schedulers took over."""
    decay = {
        "none": lambda t, span: 1.0,
        "step": lambda t, span: optim.gamma ** math.floor(t / optim.step_size),
        "exponential": lambda t, span: optim.gamma ** math.floor(t),
        "cosine": lambda t, span: 0.5 * (1.0 + math.cos(math.pi * min(t / span, 1.0))),
    }[optim.schedule]
    lrs = []
    for step in range(optim.epochs * steps_per_epoch):
        t = step / steps_per_epoch
        if t < optim.warmup_epochs:
            lrs.append(optim.lr * (0.01 + 0.99 * t / optim.warmup_epochs))
        else:
            lrs.append(optim.lr * decay(t - optim.warmup_epochs, float(optim.epochs - optim.warmup_epochs)))
    return lrs


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
@pytest.mark.parametrize("schedule", sorted(set(SCHEDULES) - {"onecycle"}))  # onecycle: torch's own curve, checked above
def test_every_schedule_follows_its_formula_step_by_step(schedule: str, warmup_epochs: int):
    optim = OptimSpec(lr=0.3, epochs=7, schedule=schedule, step_size=2, gamma=0.5, warmup_epochs=warmup_epochs)
    assert _lrs(optim, steps_per_epoch=5) == pytest.approx(_formula(optim, steps_per_epoch=5), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("schedule,warmup_epochs", [("none", 0), ("cosine", 0), ("step", 2), ("cosine", 2), ("onecycle", 0)])
@pytest.mark.parametrize("stop_after_epoch", [1, 3])  # during and after the warm-up
def test_a_resumed_schedule_continues_where_it_stopped(tmp_path: Path, schedule: str, warmup_epochs: int, stop_after_epoch: int):
    optim = OptimSpec(lr=0.3, epochs=5, schedule=schedule, step_size=2, gamma=0.5, warmup_epochs=warmup_epochs)
    steps_per_epoch, checkpoint = 4, tmp_path / "trial.pt"

    def start() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        model = torch.nn.Linear(1, 1)
        optimizer = make_optimizer(model.parameters(), optim)
        return model, optimizer, make_scheduler(optimizer, optim, steps_per_epoch)

    def train(optimizer: torch.optim.Optimizer, scheduler: Any, epochs: range) -> list[float]:
        lrs = []
        for _ in range(len(epochs) * steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    model, optimizer, scheduler = start()
    before = train(optimizer, scheduler, range(1, stop_after_epoch + 1))
    save_checkpoint(checkpoint, stop_after_epoch, model, optimizer, scheduler, [], DivergenceDetector(spec().divergence))
    model, optimizer, scheduler = start()
    epoch = restore_checkpoint(checkpoint, model, optimizer, scheduler, [], DivergenceDetector(spec().divergence))
    after = train(optimizer, scheduler, range(epoch + 1, optim.epochs + 1))
    assert before + after == pytest.approx(_lrs(optim, steps_per_epoch), rel=1e-12)


@pytest.mark.parametrize("damage", ["torn", "garbage", "another_trial"])
def test_an_unreadable_checkpoint_is_a_lost_one_and_the_trial_trains_from_its_first_epoch(tmp_path: Path, damage: str):
    checkpoint = tmp_path / "trial.pt"
    epochs_seen: list[int] = []
    with pytest.raises(Cancelled):
        run_trial(spec(epochs=3), ListTracker(), TrainingContext(
            device=CPU, checkpoint_path=checkpoint, on_epoch_end=lambda e, m: epochs_seen.append(e), should_cancel=lambda: len(epochs_seen) >= 2,
            check_every_steps=10**6,
        ))
    whole = checkpoint.read_bytes()
    if damage == "torn":  # a host crash mid-write, on storage that does not rename atomically
        checkpoint.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(b"\x00" * 1000)
    else:  # a whole checkpoint, of a network of another shape
        other = torch.nn.Linear(3, 3)
        torch.save({"model": other.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 2, "history": []}, checkpoint)

    lost: list[str] = []
    tracker = ListTracker()
    result = run_trial(spec(epochs=3), tracker, TrainingContext(device=CPU, checkpoint_path=checkpoint, on_checkpoint_lost=lost.append))
    assert [e for e, _ in tracker.epochs] == [1, 2, 3] and result.epochs_done == 3
    assert len(lost) == 1 and "trial.pt could not be read" in lost[0] and "trained again from epoch 1" in lost[0]
    # The same as a first attempt from scratch: nothing of the damaged file, or of what it partly loaded, remains.
    fresh = ListTracker()
    run_trial(spec(epochs=3), fresh, TrainingContext(device=CPU))
    assert [m["train_loss"] for _, m in tracker.epochs] == pytest.approx([m["train_loss"] for _, m in fresh.epochs], rel=1e-4)


def test_a_checkpoint_is_written_under_a_name_of_its_own_then_renamed(tmp_path: Path, monkeypatch):
    from workers.training import train

    renamed: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(train.os, "replace", lambda src, dst: renamed.append((str(src), str(dst))) or real_replace(src, dst))
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(train.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "trial.pt"
    for _ in range(2):
        train._write_checkpoint(path, {"epoch": 1})
    [(first, _), (second, _)] = renamed
    assert first != second and all(name.endswith(".tmp") and str(os.getpid()) not in Path(name).name for name in (first, second))
    assert len(synced) == 4  # the file and its folder, each time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial.pt"]


def test_a_checkpoint_written_while_training_goes_on_holds_the_state_it_was_given(tmp_path: Path):
    from workers.training.train import CheckpointWriter

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = make_scheduler(optimizer, spec().optim, steps_per_epoch=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "trial.pt"
    with CheckpointWriter(path) as checkpoints:
        checkpoints.save(1, model, optimizer, scheduler, [{"val_accuracy": 0.5}], DivergenceDetector(spec().divergence))
        with torch.no_grad():
            model.weight.add_(1.0)  # the next epoch changes the weights while the write may still be going on
    restored, history = torch.nn.Linear(4, 2), []
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    epoch = restore_checkpoint(path, restored, restored_optimizer, make_scheduler(restored_optimizer, spec().optim, 1), history, DivergenceDetector(spec().divergence))
    assert epoch == 1 and history == [{"val_accuracy": 0.5}]
    torch.testing.assert_close(restored.state_dict(), saved)


def test_a_failed_checkpoint_write_is_raised_unless_the_trial_is_stopping_anyway(tmp_path: Path):
    from workers.training.train import CheckpointWriter

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = make_scheduler(optimizer, spec().optim, steps_per_epoch=1)
    (tmp_path / "file").write_text("not a directory")
    unwritable = tmp_path / "file" / "trial.pt"
    with pytest.raises(OSError):
        with CheckpointWriter(unwritable) as checkpoints:
            checkpoints.save(1, model, optimizer, scheduler, [], DivergenceDetector(spec().divergence))
    with pytest.raises(Cancelled):  # the trial's own ending is what propagates; the failed write is logged
        with CheckpointWriter(unwritable) as checkpoints:
            checkpoints.save(1, model, optimizer, scheduler, [], DivergenceDetector(spec().divergence))
            raise Cancelled("cancelled on request")


def test_a_checkpoint_snapshot_shares_nothing_training_changes():
    from workers.training.train import _snapshot

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": [{"val_accuracy": 0.5}], "epoch": 1}
    snap = _snapshot(state)
    expected = {"weight": model.weight.detach().clone(), "exp_avg": optimizer.state[model.weight]["exp_avg"].clone()}
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # the next epoch moves the weights and the optimizer's moments in place
    state["history"].append({"val_accuracy": 0.6})
    state["history"][0]["val_accuracy"] = 0.0
    torch.testing.assert_close(snap["model"]["weight"], expected["weight"])
    torch.testing.assert_close(snap["optimizer"]["state"][0]["exp_avg"], expected["exp_avg"])
    assert snap["history"] == [{"val_accuracy": 0.5}] and snap["epoch"] == 1
    assert snap["optimizer"]["param_groups"][0]["betas"] == optimizer.param_groups[0]["betas"]
    assert type(snap["model"]) is type(state["model"]) and snap["model"]._metadata == state["model"]._metadata, "load_state_dict reads the versions"
    assert snap["model"]._metadata is not state["model"]._metadata


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
def test_the_fused_optimizer_follows_the_per_tensor_one(optimizer: str):
    from workers.training.train import OPTIMIZERS

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    optim = spec().optim.model_copy(update={"optimizer": optimizer, "lr": 1e-2, "weight_decay": 1e-3})
    losses = {}
    for fused in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
        opt = OPTIMIZERS[optimizer](list(model.parameters()), optim, fused)
        losses[fused] = []
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert make_optimizer(list(model.parameters()), optim).defaults["fused"] is True, "the CPU gets the fused kernel"
