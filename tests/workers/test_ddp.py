"""Data-parallel trials on the CPU (gloo, 2 processes): the same loss curve as one process at the same global batch."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.data.sets import InvalidData
from models.spec.trial import TrialSpec
from tests.workers.trackers import ListTracker
from workers.training.batching import BatchPlan
from workers.training.devices import _first_failure, train_data_parallel, train_on_devices, train_rank
from workers.training.parallel import NotEnoughDevices, Parallel, RankFailed, leave_group
from workers.training.train import TrainingContext, run_trial

CPU = torch.device("cpu")
EPOCHS = 3


def trial(batch_size: int, devices: int = 1) -> TrialSpec:
    # Group norm: batch norm's statistics would be per process, and differ from one process's by design.
    return TrialSpec.model_validate({
        "model": {"channels": [8, 16], "convs_per_stage": 1, "norm": "group", "norm_groups": 4},
        "optim": {"optimizer": "momentum", "lr": 0.05, "epochs": EPOCHS, "batch_size": batch_size},
        "devices": devices,
    })


def curve(tracker: ListTracker) -> list[float]:
    return [m[key] for _, m in tracker.epochs for key in ("train_loss", "val_loss", "val_accuracy")]


def _rank(rank: int, world: int, init_method: str, out: str) -> None:
    """One process of the spawned test: train in step with the others, rank 0 writes its curve."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    in_step = False
    try:
        tracker = ListTracker()
        run_trial(trial(batch_size=32, devices=world), tracker, TrainingContext(device=CPU, parallel=Parallel(rank, world, CPU), check_every_steps=5))
        in_step = True
        if rank == 0:
            Path(out).write_text(json.dumps(curve(tracker)))
    finally:
        leave_group(in_step)  # as the worker's ranks leave it


@pytest.fixture(scope="module")
def one_process() -> list[float]:
    tracker = ListTracker()
    run_trial(trial(batch_size=64), tracker, TrainingContext(device=CPU, check_every_steps=5))
    return curve(tracker)


@pytest.mark.integration  # spawns a second process
def test_two_spawned_processes_follow_the_one_process_curve(tmp_path: Path, one_process: list[float]):
    out = tmp_path / "rank0.json"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == pytest.approx(one_process, rel=1e-3)


@pytest.mark.integration  # spawns a second process
def test_worker_path_trains_as_rank_zero_with_a_spawned_rank_one(tmp_path: Path, one_process: list[float]):
    tracker = ListTracker()
    told: list[BatchPlan] = []
    ctx = TrainingContext(device=CPU, check_every_steps=5, checkpoint_path=tmp_path / "trial.pt", on_setup=told.append)
    result = train_data_parallel(trial(batch_size=32, devices=2), tracker, ctx)
    assert curve(tracker) == pytest.approx(one_process, rel=1e-3)
    assert result.epochs_done == EPOCHS and tracker.summary  # rank 0 logs as a one-process trial does
    assert (told[0].effective, told[0].batch_size) == (64, 32)
    assert not dist.is_initialized()  # the worker process can run its next trial


def test_a_worker_with_fewer_devices_fails_the_trial_with_a_reason():
    with pytest.raises(NotEnoughDevices, match="asks for devices=2, and this worker owns 1 CPU processes") as caught:
        train_on_devices(trial(batch_size=32, devices=2), ListTracker(), TrainingContext(device=CPU), owned=1)
    assert caught.value.outcome == "error"


def test_a_failing_rank_writes_its_ending_and_rank_zero_reports_it(tmp_path: Path):
    payload = trial(batch_size=32).model_dump(mode="json") | {"data": {"name": "npz", "path": "missing.npz"}}
    with pytest.raises(InvalidData):  # a rank alone in its group, failing as rank 1 of a trial would
        train_rank(0, 1, f"file://{tmp_path / 'rendezvous'}", payload, "cpu", None, None, 5, str(tmp_path / "rank1.json"))
    assert not dist.is_initialized()
    failure = _first_failure(tmp_path, [subprocess.Popen(["true"])])
    assert isinstance(failure, RankFailed) and (failure.outcome, failure.mlflow_status) == ("invalid_data", "FAILED")
    assert failure.reason.startswith("rank 1 of the data-parallel trial failed: dataset 'npz' needs a data root")


def test_leaving_the_group_frees_the_ddp_wrapper_before_the_group(tmp_path: Path):
    # DDP sits in a reference cycle and its reducer holds the gloo group: freed only at interpreter
    # exit, the group's teardown aborted a rank (SIGABRT). leave_group collects it while the group lives.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)

    def train_briefly() -> weakref.ref:
        net = Parallel(0, 1, CPU).wrap(torch.nn.Linear(3, 2))
        net(torch.randn(4, 3)).sum().backward()
        return weakref.ref(net)

    gc.disable()  # as when the collector has not run yet
    try:
        wrapper = train_briefly()  # in a fresh process the cycle keeps it alive past its frame
        leave_group(in_step=True)
        assert wrapper() is None and not dist.is_initialized()
    finally:
        gc.enable()


def test_the_collectives_know_nothing_of_the_loop():
    # The loop holds a Parallel on every rank: it imports the collectives, never the other way round.
    probe = "import sys, workers.training.parallel; print(' '.join(sorted(m for m in sys.modules if m.startswith('workers'))))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert "workers.training.parallel" in loaded
    assert not {"workers.training.train", "workers.training.devices"} & set(loaded), loaded
