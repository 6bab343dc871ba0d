"""Leases that mean something, and retries that lose nothing, in real worker processes.

- A worker paused (SIGSTOP) past its lease's TTL while another takes the trial over stops without
  writing once it wakes (SIGCONT): every epoch of every metric is logged exactly once, the run
  carries the second holder's fence, no checkpoint of either holder's is left, and a stale
  redelivery of the message after that trains nothing.
- A range test whose lease a dead process still holds is tried again once it lapses, not dropped.
- MLflow down, longer than the client's own retries, when a worker picks a trial up: the task is
  retried with backoff, and the trial runs once MLflow is back.

These tests use their own Redis database (no session worker takes their messages), their own MLflow
experiment, short leases and a fast retry policy, and turn the reconciler off so that only what
the test does moves the work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from mlflow.tracking import MlflowClient

from models.messages import RangeTestMessage, TrialMessage
from models.spec.trial import TrialSpec
from models.spec.tuning import LrRangeSpec
from models.store.keys import lease_key
from models.store.share import Route
from service.api import create_app
from tests.conftest import Service, free_port, start_worker, wait_for
from tests.helpers import tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration

LEASE_TTL_S = 5
METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second")


def _own_db(redis_url: str, db: int) -> str:
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def lease_env(worker_env: dict[str, str], redis_url: str) -> dict[str, str]:
    return {
        **worker_env,
        "CONVTUNE_REDIS_URL": _own_db(redis_url, 13),
        "CONVTUNE_LEASE_TTL_S": str(LEASE_TTL_S),
        "CONVTUNE_RECONCILE_INTERVAL_S": "0",
        "CONVTUNE_RETRY_BACKOFF_S": "1",
        "CONVTUNE_RETRY_BACKOFF_MAX_S": "3",
        "CONVTUNE_LOG_MODEL": "false",
    }


@pytest.fixture(scope="module")
def lease_app(api_settings, lease_env):
    return create_app(api_settings.model_copy(update={"redis_url": lease_env["CONVTUNE_REDIS_URL"], "experiment": f"leases-{uuid.uuid4().hex[:8]}"}))


@pytest.fixture(scope="module")
def two_workers(lease_env: dict[str, str]) -> Iterator[list[Service]]:
    workers = [start_worker(f"lease-worker{i}", lease_env) for i in range(2)]
    yield workers
    for w in workers:
        w.stop()


def pool_child(worker: Service) -> int:
    children = subprocess.run(["pgrep", "-P", str(worker.popen.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, f"expected one prefork child, found {children}"
    return int(children[0])


def resend(app, trial_id: str, spec: dict) -> None:
    """Send a trial's message again, as Redis does after a visibility timeout (or the reconciler)."""
    app.extensions["convtune"].send(TrialMessage(trial_id=trial_id, spec=TrialSpec.model_validate(spec).model_dump(mode="json")), Route("cpu"))


def steps_per_metric(mlflow_client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    return {key: sorted(m.step for m in mlflow_client.get_metric_history(run_id, key)) for key in METRICS}


def test_a_worker_paused_past_its_lease_stops_without_writing_and_the_trial_trains_once(lease_app, two_workers, lease_env, mlflow_client):
    client = lease_app.test_client()
    epochs = 30
    spec = tiny_trial(optim={"epochs": epochs, "batch_size": 32}, data={"name": "shapes", "num_samples": 600, "image_size": 16})
    trial_id = client.post("/trials", json=spec).get_json()["id"]
    wait_for_trial(client, trial_id, until=lambda t: t["epochs_done"] >= 2)
    first = next(w for w in two_workers if trial_id in w.log())
    other = next(w for w in two_workers if w is not first)
    paused = pool_child(first)

    os.kill(paused, signal.SIGSTOP)  # a GC pause, a frozen VM, a debugger: the heartbeat stops with it
    try:
        time.sleep(LEASE_TTL_S + 1.5)
        assert not redis.Redis.from_url(lease_app.extensions["convtune"].settings.redis_url).exists(lease_key(trial_id)), "the lease lapsed"
        resend(lease_app, trial_id, spec)  # the stale worker's message, delivered again: the other worker takes it
        assert wait_for(lambda: "resuming from its last checkpoint" in other.log(), 60), other.log()[-3000:]
        wait_for_trial(client, trial_id, until=lambda t: t["epochs_done"] >= 3 or t["status"] != "running")
    finally:
        os.kill(paused, signal.SIGCONT)
    assert wait_for(lambda: "stopped without recording anything" in first.log(), 60), first.log()[-3000:]

    resend(lease_app, trial_id, spec)  # a stale redelivery while the lease is the other worker's: it trains nothing
    trial = wait_for_trial(client, trial_id, timeout_s=240)
    assert trial["status"] == "succeeded", trial["reason"]
    assert steps_per_metric(mlflow_client, trial_id) == {key: list(range(1, epochs + 1)) for key in METRICS}
    tags = mlflow_client.get_run(trial_id).data.tags
    assert tags["convtune.attempts"] == "2" and tags["convtune.fence"] == "2" and tags["convtune.epochs_done"] == str(epochs)
    assert not list(Path(lease_env["CONVTUNE_CHECKPOINT_DIR"]).glob(f"{trial_id}*")), "the ending removed every holder's checkpoint"
    assert wait_for(lambda: "duplicate delivery skipped" in first.log() + other.log() or "being trained by another worker" in first.log() + other.log(), 30)
    assert all(w.alive() for w in two_workers)


def test_a_range_test_whose_lease_a_dead_process_holds_runs_once_it_lapses(lease_app, two_workers, mlflow_client):
    client = lease_app.test_client()
    body = {"trial": tiny_trial(), "steps": 40}
    test_id = client.post("/lr-finder", json={**body, "trial": tiny_trial(queue="gpu")}).get_json()["id"]  # parked where no worker listens
    lease = redis.Redis.from_url(lease_app.extensions["convtune"].settings.redis_url)
    lease.set(lease_key(test_id), "a-process-killed-mid-test", px=LEASE_TTL_S * 1000)  # what a SIGKILLed pool child leaves
    spec = LrRangeSpec.model_validate(body).model_dump(mode="json")
    lease_app.extensions["convtune"].send(RangeTestMessage(run_id=test_id, spec=spec), Route("cpu"))
    deadline = time.monotonic() + 120
    while (status := client.get(f"/lr-finder/{test_id}").get_json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "succeeded", status["reason"]
    assert any("checking again" in w.log() and test_id in w.log() for w in two_workers)


class MlflowServer:
    """An ``mlflow server`` of this test's own, stopped by pid and started again on the same port and stores."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts"),
        ]
        self.server: Service | None = None
        self.start()

    def start(self) -> None:
        self.server = Service(f"mlflow-down-{self.port}", self.argv, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
        assert wait_for(lambda: self.healthy() or not self.server.alive(), 120) and self.server.alive(), self.server.log()[-3000:]

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.uri}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture()
def own_mlflow(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def test_mlflow_down_when_a_worker_picks_a_trial_up_delays_it_and_loses_nothing(api_settings, lease_env, redis_url, own_mlflow):
    env = {**lease_env, "CONVTUNE_REDIS_URL": _own_db(redis_url, 14), "CONVTUNE_MLFLOW_TRACKING_URI": own_mlflow.uri}
    app = create_app(api_settings.model_copy(update={"redis_url": env["CONVTUNE_REDIS_URL"], "mlflow_tracking_uri": own_mlflow.uri}))
    client = app.test_client()
    trial_id = client.post("/trials", json=tiny_trial(optim={"epochs": 3})).get_json()["id"]  # queued; no worker yet
    own_mlflow.stop()
    worker = start_worker("mlflow-down-worker", env)
    try:
        # Each delivery waits out MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2), then the task retries with backoff.
        assert wait_for(lambda: worker.log().count("retry 3 of") >= 1, 120), worker.log()[-3000:]
        own_mlflow.start()
        trial = wait_for_trial(client, trial_id, timeout_s=120)
        assert trial["status"] == "succeeded", trial["reason"]
        history = MlflowClient(own_mlflow.uri).get_metric_history(trial_id, "val_loss")
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert MlflowClient(own_mlflow.uri).get_run(trial_id).data.tags["convtune.attempts"] == "1", "retries after an outage are not lost workers"
    finally:
        worker.stop()
