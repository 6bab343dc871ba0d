"""Fencing: a worker that lost its trial's lease and wakes up late changes nothing a later holder wrote.

Each lease comes with a fence, higher for every later holder (a real Redis); the stores check it:
the checkpoint files (one per fence, the highest read) and the MLflow run (its fence tag, read
before an epoch's ``epochs_done`` and before the ending). Every write also asks Redis, not the
lease's cached answer. MLflow is an in-memory stand-in that keeps tags as the server does (last
write wins) and records every ending.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import torch

from models.spec.trial import TrialSpec
from models.store.keys import fence_key, lease_key
from workers.training.divergence import DivergenceDetector
from workers.training.outcomes import Ending, Superseded
from workers.training.train import CheckpointWriter, checkpoint_files, restore_checkpoint
from workers.trial.execution import _end, fence_floor
from workers.trial.lease import Lease
from workers.trial.tracking import MlflowTracker

DIVERGENCE = TrialSpec.model_validate({"model": {"channels": [8]}, "optim": {"lr": 1e-3}}).divergence


class FakeMlflow:
    """One MLflow run as the server keeps it: tags (the last write wins), metric rows, its status and every ending."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.rows: list[tuple[str, int]] = []
        self.status = "SCHEDULED"
        self.endings: list[str] = []

    def get_run(self, run_id: str) -> Any:
        info = SimpleNamespace(status=self.status, artifact_uri="file:///nowhere", lifecycle_stage="active", experiment_id="0")
        return SimpleNamespace(info=info, data=SimpleNamespace(tags=dict(self.tags)))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self.rows += [(m.key, m.step) for m in metrics]
        self.tags.update({t.key: t.value for t in tags})

    def update_run(self, run_id: str, status: str) -> None:
        self.status = status

    def set_terminated(self, run_id: str, status: str) -> None:
        self.status = status
        self.endings.append(status)


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture()
def trial_id() -> str:
    return uuid.uuid4().hex


def holder(client: redis.Redis, mlflow: FakeMlflow, trial_id: str, checkpoint: Path | None = None) -> tuple[Lease, MlflowTracker]:
    """A delivery as execute_trial makes one: read the run, take the lease above the stores' fence, start the run."""
    tracker = MlflowTracker(mlflow, trial_id, log_model=False)  # type: ignore[arg-type]
    tracker.status()
    lease = Lease(client, trial_id, ttl_s=30)
    assert lease.acquire(floor=fence_floor(tracker, checkpoint))
    tracker.hold(lease)
    tracker.start("cpu", 1)
    tracker.final_epoch = 10
    return lease, tracker


def lose(client: redis.Redis, trial_id: str) -> None:
    """Redis lost the key (or the holder was paused past its TTL): the reconciler re-sends the trial at once."""
    client.delete(lease_key(trial_id))


def paused_after_its_checks(tracker: MlflowTracker) -> None:
    """A holder whose lease checks passed just before it froze: only the fence can stop what it sends on waking."""
    tracker.still_owner = tracker.confirm_owner = lambda: True


def state(epoch: int) -> tuple[int, Any, Any, Any, list, DivergenceDetector]:
    """What a checkpoint of ``epoch`` is written from."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return epoch, model, optimizer, scheduler, [{"epoch": float(epoch)}] * epoch, DivergenceDetector(DIVERGENCE)


def restored_epoch(base: Path) -> int:
    _, model, optimizer, scheduler, _, divergence = state(0)
    return restore_checkpoint(base, model, optimizer, scheduler, [], divergence)


# --- the fence ----------------------------------------------------------------------------------


def test_each_lease_takes_a_higher_fence_than_every_earlier_one(client: redis.Redis, trial_id: str):
    first = Lease(client, trial_id, ttl_s=30)
    assert first.acquire() and first.fence == 1
    assert not Lease(client, trial_id, ttl_s=30).acquire(), "held: no fence is taken"
    first.release()
    second = Lease(client, trial_id, ttl_s=30)
    assert second.acquire() and second.fence == 2
    assert 0 < client.ttl(fence_key(trial_id)), "the counter outlives the lease, not forever"
    second.release()
    client.delete(fence_key(trial_id))  # Redis restarted without persistence: the counter is gone
    third = Lease(client, trial_id, ttl_s=30)
    assert third.acquire(floor=5) and third.fence == 6, "above what the run and its checkpoints carry"


def test_the_floor_is_the_highest_fence_the_run_and_the_checkpoints_carry(tmp_path: Path):
    tracker = MlflowTracker(FakeMlflow(), "run", log_model=False)  # type: ignore[arg-type]
    base = tmp_path / "run.pt"
    assert fence_floor(tracker, base) == 0
    (tmp_path / "run.f3.pt").write_bytes(b"")
    (tmp_path / "other.f9.pt").write_bytes(b"")
    tracker.fence_seen = 2
    assert fence_floor(tracker, base) == 3
    tracker.fence_seen = 4
    assert fence_floor(tracker, base) == 4


# --- a write asks Redis -------------------------------------------------------------------------


def test_a_lease_lost_a_moment_ago_is_found_at_the_next_write_not_half_a_ttl_later(client: redis.Redis, trial_id: str, tmp_path: Path):
    mlflow = FakeMlflow()
    lease, tracker = holder(client, mlflow, trial_id)
    lose(client, trial_id)
    assert Lease(client, trial_id, ttl_s=30).acquire(), "another worker took it at once"
    assert lease.held(), "the cheap check still trusts its last renewal (training's per-step check)"

    tracker.log_epoch(1, {"val_accuracy": 0.5})
    tracker.uploads.wait()
    assert mlflow.rows == [] and "convtune.epochs_done" not in mlflow.tags
    with pytest.raises(Superseded):
        tracker.finish(Ending("FINISHED", "succeeded", "trained"))
    assert mlflow.endings == []
    with CheckpointWriter(tmp_path / "run.pt", lambda: lease.held(strict=True), lease.fence) as checkpoints:
        checkpoints.save(*state(1))
    assert checkpoint_files(tmp_path / "run.pt") == []


def test_while_redis_does_not_answer_a_write_counts_the_lease_as_held_until_its_ttl_runs_out(client: redis.Redis, trial_id: str):
    lease = Lease(client, trial_id, ttl_s=10)
    assert lease.acquire()
    lease.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # Redis down
    assert lease.held(strict=True)
    lease._renewed_at -= 11
    assert not lease.held(strict=True) and lease.lost


# --- checkpoints --------------------------------------------------------------------------------


def test_a_stale_holders_checkpoint_never_replaces_a_later_holders(tmp_path: Path):
    base = tmp_path / "run.pt"
    with CheckpointWriter(base, fence=1) as stale:
        stale.save(*state(2))
    with CheckpointWriter(base, fence=2) as current:
        current.save(*state(3))
    assert [f for f, _ in checkpoint_files(base)] == [2], "the holder's first write removed the earlier fence's file"
    with CheckpointWriter(base, fence=1) as stale:  # paused after its lease check, it writes on waking
        stale.save(*state(5))
    assert restored_epoch(base) == 3, "a delivery resumes from the later holder's checkpoint"
    assert [f for f, _ in checkpoint_files(base)] == [2, 1]


def test_ending_a_run_deletes_every_fences_checkpoint(tmp_path: Path):
    base = tmp_path / "run.pt"
    for fence in (0, 1, 3):
        with CheckpointWriter(base, fence=fence) as writer:
            writer._written = True  # as a writer that already cleaned up: keep the others for this test
            writer.save(*state(fence + 1))
    (tmp_path / "runner.f1.pt").write_bytes(b"another run's")
    tracker = MlflowTracker(FakeMlflow(), "run", log_model=False)  # type: ignore[arg-type]
    _end(tracker, Ending("FAILED", "error", "boom"), base)
    assert checkpoint_files(base) == [] and (tmp_path / "runner.f1.pt").exists()


# --- the run ------------------------------------------------------------------------------------


def test_a_stale_holders_ending_is_refused_when_the_run_carries_a_later_fence(client: redis.Redis, trial_id: str):
    mlflow = FakeMlflow()
    _, stale = holder(client, mlflow, trial_id)
    lose(client, trial_id)
    _, current = holder(client, mlflow, trial_id)
    assert mlflow.tags["convtune.fence"] == str(current.fence) == "2"
    paused_after_its_checks(stale)
    with pytest.raises(Superseded):
        stale.finish(Ending("FAILED", "error", "the stale worker's view"))
    current.finish(Ending("FINISHED", "succeeded", "trained"))
    assert mlflow.endings == ["FINISHED"] and mlflow.tags["convtune.outcome"] == "succeeded"


def test_epochs_done_never_goes_back_when_a_stale_holders_epoch_lands_late(client: redis.Redis, trial_id: str):
    mlflow = FakeMlflow()
    _, stale = holder(client, mlflow, trial_id)
    stale.log_epoch(1, {"val_accuracy": 0.1})
    stale.uploads.wait()
    lose(client, trial_id)
    _, current = holder(client, mlflow, trial_id)
    for epoch in (1, 2, 3):
        current.log_epoch(epoch, {"val_accuracy": epoch / 10})
    current.uploads.wait()
    assert mlflow.tags["convtune.epochs_done"] == "3"

    paused_after_its_checks(stale)
    stale.log_epoch(2, {"val_accuracy": 0.2})
    stale.uploads.wait()
    assert mlflow.tags["convtune.epochs_done"] == "3"
    assert mlflow.rows.count(("val_accuracy", 2)) == 1, "the later holder's row only"


def test_an_unfenced_tracker_reads_nothing_more(client: redis.Redis, trial_id: str):
    mlflow = FakeMlflow()
    reads: list[str] = []
    real = mlflow.get_run
    mlflow.get_run = lambda run_id: reads.append(run_id) or real(run_id)  # type: ignore[method-assign]
    tracker = MlflowTracker(mlflow, trial_id, log_model=False)  # type: ignore[arg-type]
    tracker.final_epoch = 2
    tracker.log_epoch(1, {"val_accuracy": 0.1})
    tracker.finish(Ending("FINISHED", "succeeded", "trained"))
    assert reads == [] and mlflow.endings == ["FINISHED"]


def test_the_holders_fence_goes_on_the_run_with_its_start_tags(client: redis.Redis, trial_id: str):
    mlflow = FakeMlflow()
    _, tracker = holder(client, mlflow, trial_id)
    assert mlflow.tags["convtune.fence"] == str(tracker.fence) == "1" and mlflow.status == "RUNNING"
    tracker.starting("cpu", 2)  # a trial's start tags go with its batches
    assert tracker._starting is not None and tracker._starting["convtune.fence"] == "1"
