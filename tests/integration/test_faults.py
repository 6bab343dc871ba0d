"""Faults as they really happen, to real processes killed by pid: nothing accepted is ever stranded (DESIGN decision 9).

Two worker processes of their own (queue ``gpu``, where the session's worker does not listen) run
the reconciler with a short lease TTL (5 s) and sweep interval (2 s); everything else is the
product's default, the reconciler's grace of 30 s included. Each test prints what it measured.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from service.api import create_app
from tests.conftest import ARTIFACTS, Service, mlflow_healthy, start_worker, wait_for
from tests.helpers import tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration

QUEUE = "gpu"
# Short, so a test waits seconds; CONVTUNE_TEST_FAULT_LEASE_TTL_S=60 CONVTUNE_TEST_FAULT_SWEEP_S=15 measures the product's defaults.
LEASE_TTL_S = int(os.environ.get("CONVTUNE_TEST_FAULT_LEASE_TTL_S", "5"))
SWEEP_S = int(os.environ.get("CONVTUNE_TEST_FAULT_SWEEP_S", "2"))
FAULT_ENV = {"CONVTUNE_LEASE_TTL_S": str(LEASE_TTL_S), "CONVTUNE_RECONCILE_INTERVAL_S": str(SWEEP_S)}
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second")
TERMINAL = ("succeeded", "failed", "cancelled", "pruned")


def long_trial(epochs: int) -> dict[str, Any]:
    """About half a second an epoch on one core: long enough to be caught mid-trial."""
    return tiny_trial(queue=QUEUE, optim={"epochs": epochs, "batch_size": 32}, data={"name": "shapes", "num_samples": 600, "image_size": 16})


@pytest.fixture(scope="module")
def fault_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, **FAULT_ENV}


@pytest.fixture(scope="module")
def fault_workers(fault_env: dict[str, str]) -> Iterator[list[Service]]:
    """Two workers on the fault tests' queue; a test that kills one starts another in its place."""
    workers = [start_worker(f"fault-worker{i}", fault_env, queue=QUEUE) for i in range(2)]
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def studies_app(api_settings, worker_env):
    return create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]}))


@pytest.fixture(scope="module")
def studies(studies_app):
    return studies_app.test_client()


def study_body(n_trials: int) -> dict[str, Any]:
    return {
        "base": tiny_trial(queue=QUEUE, optim={"epochs": 2}), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "sampler": {"name": "random"}, "pruner": "none", "n_trials": n_trials, "parallelism": 1,
    }


def epoch_steps(mlflow_client, run_id: str) -> dict[str, list[int]]:
    return {key: sorted(m.step for m in mlflow_client.get_metric_history(run_id, key)) for key in EPOCH_METRICS}


def worker_logs() -> str:
    """Every log of this session's processes: the session's other workers sweep too, and any of them may act."""
    return "".join(path.read_text(errors="replace") for path in ARTIFACTS.glob("*.log"))


def status_of(client, path: str) -> str:
    body = client.get(path).get_json()
    return body.get("state") or body["status"]


def wait_all_ended(clients: dict[str, Any], paths: dict[str, str], since: float, bound_s: float) -> dict[str, tuple[str, float]]:
    """Poll every piece of work until all have ended or ``bound_s`` passed; what -> (status, seconds after ``since`` it was seen ended)."""
    ended: dict[str, tuple[str, float]] = {}
    while len(ended) < len(paths) and time.monotonic() - since < bound_s:
        for what, path in paths.items():
            status = status_of(clients[what], path) if what not in ended else None
            if status in TERMINAL:
                ended[what] = (status, round(time.monotonic() - since, 1))
        time.sleep(0.5)
    still = {what: status_of(clients[what], path) for what, path in paths.items() if what not in ended}
    assert not still, f"still open {bound_s:.0f}s later: {still} (ended: {ended})"
    return ended


def test_a_worker_killed_whole_mid_trial_is_resumed_on_the_other_from_its_checkpoint(client, fault_workers, fault_env, mlflow_client):
    epochs = 30
    trial_id = client.post("/trials", json=long_trial(epochs)).get_json()["id"]
    wait_for_trial(client, trial_id, until=lambda t: t["epochs_done"] >= 3, timeout_s=120)
    received = f"[{trial_id}] received"
    holder = next(i for i, w in enumerate(fault_workers) if received in w.log())
    killed = fault_workers[holder]

    os.killpg(killed.popen.pid, signal.SIGKILL)  # the main process and its pool, as a node or container loss does
    killed.popen.wait(timeout=10)
    killed_at = time.monotonic()
    # Its message stays in Redis' unacked hash (until the 4 h visibility timeout); the lease lapses after its TTL.
    resumed = wait_for(lambda: mlflow_client.get_run(trial_id).data.tags.get("convtune.attempts") == "2", LEASE_TTL_S + 3 * SWEEP_S + 60, interval_s=0.1)
    recovery_s = time.monotonic() - killed_at
    print(f"\nworker killed whole at epoch >= 3: trial resumed on the other worker {recovery_s:.1f}s later (lease TTL {LEASE_TTL_S}s, sweeps every {SWEEP_S}s)")
    assert resumed, "the trial was not resumed"

    trial = wait_for_trial(client, trial_id, timeout_s=240)
    assert trial["status"] == "succeeded", trial["reason"]
    assert mlflow_client.get_run(trial_id).data.tags["convtune.attempts"] == "2"
    assert epoch_steps(mlflow_client, trial_id) == {key: list(range(1, epochs + 1)) for key in EPOCH_METRICS}
    assert f"reconciler: resent trial {trial_id}: running with no live lease" in worker_logs()
    assert recovery_s < LEASE_TTL_S + 3 * SWEEP_S + 15, f"resumed {recovery_s:.1f}s after the kill"
    fault_workers[holder] = start_worker(f"fault-worker{holder}-again", fault_env, queue=QUEUE)


def test_redis_flushed_with_work_in_every_state_leaves_nothing_stranded(client, studies, fault_workers, redis_url):
    # The grace (30 s) before a queued run with no message is re-sent, plus the training of everything on two workers.
    bound_s = 180
    study = studies.post("/studies", json=study_body(4)).get_json()
    assert wait_for(lambda: studies.get(f"/studies/{study['id']}").get_json()["progress"]["finished"] >= 1, 120), "the study never got going"
    test_id = client.post("/lr-finder", json={"trial": {**tiny_trial(queue=QUEUE), "model": {"channels": [16, 32]}}, "steps": 1500, "end_lr": 1e-3}).get_json()["id"]
    running_id = client.post("/trials", json=long_trial(20)).get_json()["id"]
    queued_ids = [client.post("/trials", json=tiny_trial(queue=QUEUE)).get_json()["id"] for _ in range(2)]
    assert wait_for(lambda: client.get(f"/lr-finder/{test_id}?curve=false").get_json()["steps_done"] > 0, 120), "the range test never started"

    paths = {"study": f"/studies/{study['id']}", "range test": f"/lr-finder/{test_id}?curve=false", "long trial": f"/trials/{running_id}"}
    paths.update({f"queued trial {i}": f"/trials/{t}" for i, t in enumerate(queued_ids)})
    before = {what: status_of(studies if what == "study" else client, path) for what, path in paths.items()}
    # What a Redis restarted without persistence remembers (FLUSHDB: the tests' database is all convtune uses).
    redis.Redis.from_url(redis_url).flushdb()
    flushed_at = time.monotonic()
    print(f"\nRedis flushed with: {before}")

    ended = wait_all_ended({what: studies if what == "study" else client for what in paths}, paths, flushed_at, bound_s)
    print(f"ended after the flush (status, seconds): {ended}")
    assert all(ended[f"queued trial {i}"][0] == "succeeded" for i in range(2)), ended
    assert all(f"reconciler: resent trial {t}: " in worker_logs() for t in queued_ids)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'convtune_reconciler_actions_total\{(?=[^}]*kind="trial")(?=[^}]*action="resent")[^}]*\} [1-9]', metrics), metrics[-2000:]


def test_mlflow_stopped_for_20s_mid_trial_then_started_again_the_trial_succeeds_with_every_epoch_once(
    client, fault_workers, mlflow_server, mlflow_client,
):
    epochs = 40
    trial_id = client.post("/trials", json=long_trial(epochs)).get_json()["id"]
    wait_for_trial(client, trial_id, until=lambda t: t["epochs_done"] >= 2, timeout_s=120)
    mlflow_server.stop()
    stopped_at = time.monotonic()
    time.sleep(20)
    mlflow_server.start_again()  # the same port, backend store and artifacts
    assert wait_for(lambda: mlflow_healthy(mlflow_server.uri), 120), mlflow_server.log()[-3000:]
    back_at = time.monotonic()

    trial = wait_for_trial(client, trial_id, timeout_s=300)
    print(f"\nMLflow down {back_at - stopped_at:.0f}s (20 s stopped, then its start); the trial ended {time.monotonic() - back_at:.0f}s after it was back")
    assert trial["status"] == "succeeded", trial["reason"]
    assert epoch_steps(mlflow_client, trial_id) == {key: list(range(1, epochs + 1)) for key in EPOCH_METRICS}


def test_work_whose_message_was_never_sent_runs_and_a_cancelled_study_ends(app, client, studies_app, studies, fault_workers, monkeypatch):
    # An API process that died between creating the runs and sending their messages: nothing was sent.
    for api in (app, studies_app):
        monkeypatch.setattr(api.extensions["convtune"], "send", lambda message, queue: None)
    trial_id = client.post("/trials", json=tiny_trial(queue=QUEUE)).get_json()["id"]
    test_id = client.post("/lr-finder", json={"trial": tiny_trial(queue=QUEUE), "steps": 100}).get_json()["id"]
    study_id = studies.post("/studies", json=study_body(2)).get_json()["id"]
    cancelled_id = studies.post("/studies", json=study_body(2)).get_json()["id"]
    monkeypatch.undo()
    accepted_at = time.monotonic()
    assert studies.post(f"/studies/{cancelled_id}/cancel").status_code == 202  # no worker holds any of it: ended now, or by the reconciler

    paths = {"trial": f"/trials/{trial_id}", "range test": f"/lr-finder/{test_id}?curve=false", "study": f"/studies/{study_id}", "cancelled study": f"/studies/{cancelled_id}"}
    # The grace (30 s) before a queued run with no message is re-sent, a sweep, then the (tiny) work itself.
    ended = wait_all_ended({what: studies if "study" in what else client for what in paths}, paths, accepted_at, 120)
    print(f"\nnever sent, then ended (status, seconds after the POSTs): {ended}")
    assert {what: status for what, (status, _) in ended.items()} == {
        "trial": "succeeded", "range test": "succeeded", "study": "succeeded", "cancelled study": "cancelled",
    }
    for run_id in (trial_id, test_id, study_id):
        assert f" {run_id}: " in worker_logs(), f"no reconciler line names {run_id}"
