"""A study's step lost at its worst moments, with real worker processes: every trial the study runs is recorded as it ended.

Two workers of their own on queue ``gpu`` (where the session's worker does not listen), sweeping
every 2 s with a grace of 3 s and a lease TTL of 5 s. The workers' beats (:mod:`models.store.fleet`)
are simulated here: a thread beats for the surviving worker, listing what it holds.

- A step killed whole (its worker's process group, SIGKILL) after its Optuna trial started but
  before it recorded the trial: its message is given back to the queue (no live worker holds it),
  the slot's next delivery fails the orphan ``worker_lost`` and runs its grid point again.
- A trial whose run ended ``succeeded`` but which Optuna still has RUNNING (its step died in
  between): the step delivered again tells Optuna from the run, and the study chooses it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import optuna
import pytest
import redis

from models.messages import UNACKED_KEY, StudyStepMessage
from models.store import fleet, runs
from models.store.budget import StudyBudget
from models.store.runs import KIND, TAG
from models.store.search import USER_ATTR, open_storage
from service.api import create_app
from tests.conftest import Service, free_port, start_worker, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

QUEUE = "gpu"
RECOVERY_ENV = {"CONVTUNE_RECONCILE_INTERVAL_S": "2", "CONVTUNE_RECONCILE_GRACE_S": "3", "CONVTUNE_LEASE_TTL_S": "5"}


class StallingProxy:
    """An HTTP proxy to the mlflow server that holds every run-creating request while ``stall`` is set."""

    def __init__(self, upstream: str):
        self.stall, self.stalled = threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.stall.is_set() and self.path.endswith("/runs/create"):
                    proxy.stalled.set()
                    time.sleep(3600)  # until its client is killed
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                answer = httpx.request(self.command, upstream + self.path, content=body, headers=headers, timeout=30)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class SimulatedBeat:
    """Beats for a live worker as its main process would: it holds every unacked message but those of ``dead`` tags."""

    def __init__(self, client: redis.Redis, name: str):
        self.client, self.name, self.dead = client, name, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            held = [json.loads(raw)[0]["headers"]["id"] for tag, raw in self.client.hgetall(UNACKED_KEY).items() if tag not in self.dead]
            fleet.beat(self.client, self.name, [QUEUE], held, served_ttl_s=60)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.delete(f"convtune:fleet:worker:{self.name}")


@pytest.fixture(scope="module")
def recovery_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, **RECOVERY_ENV}


@pytest.fixture(scope="module")
def studies(api_settings, worker_env):
    return create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]}))


@pytest.fixture()
def survivor(recovery_env: dict[str, str], redis_url: str) -> Iterator[Any]:
    """Starts the surviving worker, and its beat, when called; stopped after the test."""
    started: list[tuple[Service, SimulatedBeat]] = []

    def start() -> tuple[Service, SimulatedBeat]:
        started.append((start_worker("recovery-survivor", recovery_env, queue=QUEUE), SimulatedBeat(redis.Redis.from_url(redis_url), "recovery-survivor@test")))
        return started[-1]

    yield start
    for worker, beat in started:
        beat.stop()
        worker.stop()


def study_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "base": tiny_trial(queue=QUEUE, optim={"epochs": 1}), "search_space": {"model.activation": ["relu", "gelu"]},
        "sampler": {"name": "grid"}, "pruner": "none", "n_trials": 2, "parallelism": 1,
    }
    return {**body, **overrides}


def wait_ended(mlflow_client, study_id: str, timeout_s: float) -> Any:
    assert wait_for(lambda: mlflow_client.get_run(study_id).info.status in runs.TERMINAL_STATUSES, timeout_s, interval_s=0.5), (
        f"study {study_id} still {mlflow_client.get_run(study_id).info.status} after {timeout_s:.0f}s"
    )
    return mlflow_client.get_run(study_id)


def test_a_step_killed_before_it_recorded_its_trial_is_given_back_and_its_grid_point_runs(
    studies, recovery_env, mlflow_uri, mlflow_client, redis_url, survivor,
):
    proxy = StallingProxy(mlflow_uri)
    proxy.stall.set()
    victim = start_worker("recovery-victim", {**recovery_env, "CONVTUNE_MLFLOW_TRACKING_URI": proxy.uri}, queue=QUEUE)
    client = redis.Redis.from_url(redis_url)
    try:
        study_id = studies.test_client().post("/studies", json=study_body()).get_json()["id"]
        assert proxy.stalled.wait(60), victim.log()[-3000:]  # its trial started in Optuna; its run is being created
        dead = set(client.hkeys(UNACKED_KEY))  # what the victim holds
        worker, beat = survivor()
        beat.dead.update(dead)
        os.killpg(victim.popen.pid, signal.SIGKILL)  # the worker's main process and its pool, as a lost host
        victim.popen.wait(10)
        killed_at = time.monotonic()

        parent = wait_ended(mlflow_client, study_id, 90)
        print(f"\nstep killed before recording its trial: study ended {time.monotonic() - killed_at:.1f}s later")
    finally:
        victim.stop(signal.SIGKILL)
        proxy.server.shutdown()
    assert parent.info.status == "FINISHED", parent.data.tags.get(TAG.REASON)
    trials = optuna.load_study(study_name=study_id, storage=open_storage(recovery_env["CONVTUNE_STUDY_STORAGE"])).trials
    lost = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(lost) == 1 and lost[0].user_attrs[USER_ATTR.OUTCOME] == "worker_lost"
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and len({json.dumps(t.params, sort_keys=True) for t in done}) == 2  # both grid points ran
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    assert f"requeued study {study_id}-1" in worker.log()


def test_a_trial_that_succeeded_before_optuna_was_told_is_told_from_its_run_when_its_step_comes_again(
    studies, recovery_env, mlflow_client, redis_url, survivor, monkeypatch,
):
    survivor()
    services = studies.extensions["convtune"]
    captured: list[tuple[Any, str]] = []
    real_send = services.send
    monkeypatch.setattr(services, "send", lambda message, queue: captured.append((message, queue)))  # nothing reaches a worker yet
    study_id = studies.test_client().post("/studies", json=study_body(n_trials=1, sampler={"name": "random"})).get_json()["id"]
    assert [m for m, _ in captured] == [StudyStepMessage(study_id=study_id, slot=1)]

    # What a step that died between ending its trial's run and telling Optuna leaves behind.
    stored = optuna.load_study(study_name=study_id, storage=open_storage(recovery_env["CONVTUNE_STUDY_STORAGE"]))
    trial = stored.ask()
    trial.suggest_categorical("model.activation", ["relu", "gelu"])
    experiment_id = mlflow_client.get_run(study_id).info.experiment_id
    tags = {TAG.KIND: KIND.TRIAL, TAG.STUDY_ID: study_id, TAG.PARENT: study_id, TAG.STUDY_TRIAL: str(trial.number), TAG.QUEUE: QUEUE}
    run_id = runs.create_started_run(mlflow_client, experiment_id, name="told late", tags=tags).run_id
    for key, value in ((USER_ATTR.SLOT, 1), (USER_ATTR.TRIAL_ID, run_id)):
        trial.set_user_attr(key, value)
    StudyBudget(redis.Redis.from_url(redis_url), study_id).record_slot(1, run_id, trial.number)
    runs.end_run(mlflow_client, run_id, "FINISHED", "succeeded", "trained 1 epochs", metrics={"val_accuracy": 0.93}, tags={TAG.EPOCHS_DONE: "1"})

    real_send(*captured[0])  # delivered again, as Redis or the reconciler does
    parent = wait_ended(mlflow_client, study_id, 60)
    assert parent.info.status == "FINISHED", parent.data.tags.get(TAG.REASON)
    assert parent.data.tags[TAG.BEST_TRIAL_ID] == run_id and parent.data.metrics["best_val_accuracy"] == pytest.approx(0.93)
    told = optuna.load_study(study_name=study_id, storage=open_storage(recovery_env["CONVTUNE_STUDY_STORAGE"])).trials[trial.number]
    assert told.state == optuna.trial.TrialState.COMPLETE and told.user_attrs[USER_ATTR.OUTCOME] == "succeeded"


def test_a_resumed_trial_judges_best_epoch_over_all_its_epochs(tmp_path, monkeypatch, redis_url):
    """Its checkpoint holds the epochs before the resume; the epochs this delivery trains start after them."""
    from types import SimpleNamespace

    from models.spec.study import StudySpec
    from models.spec.trial import TrialSpec
    from workers.study import step
    from workers.training.outcomes import Ending

    spec = StudySpec.model_validate({
        "base": tiny_trial(optim={"epochs": 4}), "search_space": {"model.activation": ["relu", "gelu"]}, "pruner": "none", "n_trials": 1,
        "objective": {"metric": "val_accuracy", "value": "best_epoch"},
    })
    rt = SimpleNamespace(settings=SimpleNamespace(data_root=None, lease_ttl_s=5), redis=redis.Redis.from_url(redis_url))
    before = [{"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.99, "val_loss": 0.1}]  # what the dead delivery checkpointed

    def resumed(trial_id, payload, rt_, on_epoch_end=None, on_resume=None, **_):  # this delivery restores 2 epochs, trains 3 and 4
        on_resume(before)  # as run_trial does once it restored the checkpoint (tests/workers/test_train.py)
        on_epoch_end(3, {"val_accuracy": 0.8, "val_loss": 0.5})
        on_epoch_end(4, {"val_accuracy": 0.85, "val_loss": 0.4})
        return Ending("FINISHED", "succeeded", "trained 4 epochs")

    monkeypatch.setattr(step, "execute_trial", resumed)
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    objective = step.StudyObjective("study", 1, spec, rt, None, "1", QUEUE, {})
    value = objective._train(trial, "run-1", TrialSpec.model_validate(spec.base.model_dump(mode="json")))
    assert value == pytest.approx(0.99)
    assert trial.user_attrs[USER_ATTR.EPOCHS] == 4
