"""The failure policy (workers.failures), leases that can be lost (workers.trial.lease), and a loop that stops writing."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import redis
import torch
from celery import Celery
from celery.exceptions import Reject
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from models.messages import NotSent, celery_config
from models.spec.trial import TrialSpec
from tests.workers.trackers import ListTracker
from workers.failures import is_infrastructure, task_options
from workers.settings import WorkerSettings
from workers.training.divergence import DivergenceDetector
from workers.training.outcomes import Superseded
from workers.training.train import CheckpointWriter, TrainingContext, run_trial
from workers.trial.lease import Lease

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("refused"), redis.TimeoutError("stalled"), NotSent("not taken"), ConnectionRefusedError(), OSError("disk"),
        MlflowException("API request to http://x failed with exception ConnectionError"),  # unreachable: INTERNAL_ERROR
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED),
        optuna.exceptions.StorageInternalError("db down"),
    ],
)
def test_service_failures_are_infrastructure(exc: BaseException):
    assert is_infrastructure(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"), KeyError("x"), MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST),
        MlflowException("param already logged", error_code=INVALID_PARAMETER_VALUE),
    ],
)
def test_the_work_failing_is_not_infrastructure(exc: BaseException):
    assert not is_infrastructure(exc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def dead_broker_app() -> Celery:
    """An app whose broker does not answer: nothing it publishes gets through."""
    app = Celery("test-failures", set_as_current=False)
    app.conf.update(celery_config(f"redis://127.0.0.1:{_free_port()}/0", 3600, socket_timeout_s=1, sender=True))
    return app


def _task(app: Celery, raises: BaseException, abandoned: list, **overrides: Any):
    settings = WorkerSettings(retry_max=overrides.pop("retry_max", 3))

    @app.task(name=f"t.{len(app.tasks)}", **task_options(settings, lambda message, reason: abandoned.append((message, reason)), **overrides))
    def task(self, message: dict) -> None:
        raise raises

    return task


def _as_worker(task, retries: int = 0) -> None:
    """Make ``task.request`` look like a worker's delivery (not a call in this process)."""
    task.push_request(id="task-1", retries=retries, called_directly=False, is_eager=False, kwargs={"message": {"trial_id": "t1"}}, args=[], delivery_info={})


def test_a_bug_is_not_retried_and_its_run_is_abandoned(dead_broker_app: Celery):
    abandoned: list = []
    task = _task(dead_broker_app, ValueError("boom"), abandoned)
    _as_worker(task)
    with pytest.raises(ValueError, match="boom"):
        task.run({"trial_id": "t1"})
    assert abandoned == [({"trial_id": "t1"}, "failed: ValueError: boom")]


def test_spent_retries_abandon_the_run_naming_the_infrastructure_failure(dead_broker_app: Celery):
    abandoned: list = []
    task = _task(dead_broker_app, redis.ConnectionError("Error 111 connecting"), abandoned, retry_max=3)
    _as_worker(task, retries=3)
    with pytest.raises(redis.ConnectionError):
        task.run({"trial_id": "t1"})
    [(message, reason)] = abandoned
    assert message == {"trial_id": "t1"}
    assert reason == "infrastructure failure, given up after 3 retries: ConnectionError: Error 111 connecting"


def test_a_retry_the_broker_refuses_puts_the_message_back_instead_of_dropping_it(dead_broker_app: Celery):
    abandoned: list = []
    task = _task(dead_broker_app, MlflowException("API request failed with exception ConnectionError"), abandoned)
    _as_worker(task, retries=1)
    with pytest.raises(Reject) as rejected:
        task.run({"trial_id": "t1"})
    assert rejected.value.requeue is True
    assert abandoned == []


def test_a_callback_task_retries_its_own_errors_too(dead_broker_app: Celery):
    class ReceiverDown(Exception):
        pass

    abandoned: list = []
    task = _task(dead_broker_app, ReceiverDown("503"), abandoned, retry_also=(ReceiverDown,))
    _as_worker(task)
    with pytest.raises(Reject):  # retried (the dead broker then refuses the retry), not given up
        task.run({"trial_id": "t1"})
    assert abandoned == []


class FakeRedis:
    """Just what a Lease asks of Redis: the acquire script (SET NX PX, then the next fence) and the compare-and-set scripts."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.down = False
        self.fence = 0

    def eval(self, script: str, n: int, *keys_and_args: Any) -> int:
        if self.down:
            raise redis.ConnectionError("down")
        token = keys_and_args[n]
        if "incr" in script:  # acquire
            if self.value is not None:
                return 0
            self.value, self.fence = token, self.fence + 1
            return self.fence
        if self.value != token:
            return 0
        if "del" in script:
            self.value = None
        return 1


def test_a_lease_not_renewed_within_half_its_ttl_is_checked_before_a_write():
    client = FakeRedis()
    lease = Lease(client, "t1", ttl_s=10)  # type: ignore[arg-type]
    assert lease.acquire() and lease.held()
    lease._renewed_at -= 6  # paused for 6 s: the heartbeat has not run
    assert lease.held(), "still ours: the check renewed it"
    lease._renewed_at -= 12  # paused past the TTL, and another worker took it
    client.value = "someone else"
    assert not lease.held() and lease.lost
    client.value = lease.token
    assert not lease.held(), "a lost lease stays lost"


def test_a_lease_counts_as_held_while_redis_is_down_only_until_its_ttl_runs_out():
    client = FakeRedis()
    lease = Lease(client, "t1", ttl_s=10)  # type: ignore[arg-type]
    assert lease.acquire()
    client.down = True
    lease._renewed_at -= 6
    assert lease.held()
    lease._renewed_at -= 5
    assert not lease.held() and lease.lost


def test_a_worker_that_loses_its_lease_stops_without_logging_or_checkpointing(tmp_path: Path):
    checkpoint = tmp_path / "trial.pt"
    tracker = ListTracker()
    owner = {"held": True}

    def lose_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
        # Lost while epoch 2 trains (e.g. paused past the TTL), by which time epoch 1's checkpoint, written on
        # the writer's thread, has landed: wait for it, as the real pause would, before losing the lease.
        deadline = time.monotonic() + 30
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        owner["held"] = False

    spec = TrialSpec.model_validate({"model": {"channels": [8, 16]}, "optim": {"lr": 3e-3, "epochs": 4, "batch_size": 64}})
    ctx = TrainingContext(device=CPU, checkpoint_path=checkpoint, still_owner=lambda: owner["held"], on_epoch_end=lose_after_first_epoch, check_every_steps=10**6)
    with pytest.raises(Superseded, match="lost the trial's lease after epoch 1"):
        run_trial(spec, tracker, ctx)
    assert [e for e, _ in tracker.epochs] == [1]
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1, "the next holder resumes from the last epoch this worker owned"


def test_a_checkpoint_whose_write_finds_the_lease_lost_is_not_written(tmp_path: Path):
    checkpoint = tmp_path / "trial.pt"
    spec = TrialSpec.model_validate({"model": {"channels": [8, 16]}, "optim": {"lr": 3e-3, "epochs": 4, "batch_size": 64}})
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    owner = {"held": True}
    with CheckpointWriter(checkpoint, lambda: owner["held"]) as checkpoints:
        owner["held"] = False  # paused between the epoch's end and its write: another worker may hold the trial now
        checkpoints.save(1, model, optimizer, scheduler, [], DivergenceDetector(spec.divergence))
    assert not checkpoint.exists(), "a worker that lost the trial must not overwrite the new holder's checkpoint"


def test_the_lease_is_checked_with_the_cancel_flag_every_n_steps():
    checks: list[int] = []

    def still_owner() -> bool:
        checks.append(1)
        return len(checks) < 2

    spec = TrialSpec.model_validate({"model": {"channels": [8, 16]}, "optim": {"lr": 3e-3, "epochs": 50, "batch_size": 16}})
    tracker = ListTracker()
    with pytest.raises(Superseded, match="at step 10"):
        run_trial(spec, tracker, TrainingContext(device=CPU, still_owner=still_owner, check_every_steps=5))
    assert tracker.epochs == []
