"""The API degrades, never errs: Redis or MLflow down, or Redis stalled, is a quick 503 and nothing half-created.

Each test runs its own redis-server (stopped, restarted or paused by the test, never the session's)
and its own app on its own MLflow experiment; no worker consumes these Redis servers, so what was
sent stays in its queue to be looked at.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from mlflow.tracking import MlflowClient

from models.store import runs
from models.store.keys import lease_key
from models.store.runs import KIND, TAG
from models.store.share import waiting_lists
from service.api import create_app
from service.api.settings import ApiSettings
from tests.conftest import Service, free_port, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

QUICK_S = 6.0  # "within a few seconds": Redis' socket timeout (2 s) twice, plus MLflow's calls


class PrivateRedis:
    """A redis-server of this test's own, stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server: Service | None = None
        self.start()

    def start(self) -> None:
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.server = Service(f"redis-faults-{self.port}", argv)
        assert wait_for(lambda: self._answers(), 10), self.server.log()

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False


@pytest.fixture()
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    server.stop()


def _settings(api_settings: ApiSettings, tmp_path, **overrides: Any) -> ApiSettings:
    return api_settings.model_copy(update={
        "experiment": f"faults-{uuid.uuid4().hex[:8]}", "study_storage": str(tmp_path / "studies.journal"), **overrides,
    })


def study_body() -> dict[str, Any]:
    return {"base": tiny_trial(), "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}, "n_trials": 2, "parallelism": 1}


def range_test_body() -> dict[str, Any]:
    return {"trial": tiny_trial(), "steps": 40}


def timed_post(client, url: str, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    response = client.post(url, **kwargs)
    return response, time.monotonic() - t0


def assert_503(response, elapsed: float) -> None:
    assert response.status_code == 503, response.get_json()
    assert response.mimetype == "application/problem+json"
    assert int(response.headers["Retry-After"]) > 0
    assert elapsed < QUICK_S, f"answered after {elapsed:.1f}s"


def runs_of(mlflow_client: MlflowClient, experiment: str, status: str | None = None) -> list[Any]:
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    flt = f"attributes.status = '{status}'" if status else ""
    return list(mlflow_client.search_runs([found.experiment_id], filter_string=flt, max_results=1000))


def queued_task_ids(client: redis.Redis, queue: str = "cpu") -> set[str]:
    """The task ids waiting for ``queue``: on it, or in its teams' waiting queues (no worker here: the fair share moves nothing)."""
    return {json.loads(raw)["headers"]["id"] for name in waiting_lists(client, [queue]) for raw in client.lrange(name, 0, -1)}


def test_every_post_with_redis_down_is_a_quick_503_and_leaves_nothing_queued(api_settings, mlflow_client, tmp_path):
    settings = _settings(api_settings, tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    client = create_app(settings).test_client()
    for url, body in (("/trials", tiny_trial()), ("/studies", study_body()), ("/lr-finder", range_test_body())):
        response, elapsed = timed_post(client, url, json=body)
        assert_503(response, elapsed)
    response, elapsed = timed_post(client, "/trials", json=tiny_trial(), headers={"Idempotency-Key": uuid.uuid4().hex})
    assert_503(response, elapsed)
    assert runs_of(mlflow_client, settings.experiment, "SCHEDULED") == []
    for run in runs_of(mlflow_client, settings.experiment):  # each one accepted, then ended: never queued without a message
        assert run.info.status == "FAILED" and run.data.tags[TAG.REASON].startswith("not dispatched:"), run.data.tags


def test_every_post_with_mlflow_down_is_a_quick_503(api_settings, private_redis, tmp_path):
    settings = _settings(api_settings, tmp_path, redis_url=private_redis.url, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    client = create_app(settings).test_client()
    for url, body in (("/trials", tiny_trial()), ("/studies", study_body()), ("/lr-finder", range_test_body())):
        response, elapsed = timed_post(client, url, json=body)
        assert_503(response, elapsed)
    assert private_redis.client().llen("cpu") == 0, "nothing sent for a run that does not exist"


def test_cancels_and_extend_with_redis_down_are_503s_and_change_nothing(api_settings, private_redis, mlflow_client, tmp_path):
    settings = _settings(api_settings, tmp_path, redis_url=private_redis.url)
    up = create_app(settings).test_client()
    trial = up.post("/trials", json=tiny_trial()).get_json()
    study = up.post("/studies", json=study_body()).get_json()
    test = up.post("/lr-finder", json=range_test_body()).get_json()
    private_redis.stop()

    down = create_app(settings).test_client()
    for url, body in (
        (f"/trials/{trial['id']}/cancel", None), (f"/lr-finder/{test['id']}/cancel", None),
        (f"/studies/{study['id']}/cancel", None), (f"/studies/{study['id']}/extend", {"n_trials": 2}),
    ):
        response, elapsed = timed_post(down, url, json=body)
        assert_503(response, elapsed)
    for run_id in (trial["id"], study["id"], test["id"]):
        assert mlflow_client.get_run(run_id).info.status == "SCHEDULED"
    assert down.get(f"/studies/{study['id']}").get_json()["progress"]["n_trials"] == 2, "the refused extension changed nothing"

    private_redis.start()  # empty (no persistence): the messages are gone, the runs still queued; cancel ends them all
    for url in (f"/trials/{trial['id']}/cancel", f"/lr-finder/{test['id']}/cancel", f"/studies/{study['id']}/cancel"):
        response = down.post(url)  # the same app: it reconnects by itself
        assert response.status_code == 202, response.get_json()
    for run_id in (trial["id"], study["id"], test["id"]):
        run = mlflow_client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags[TAG.OUTCOME] == "cancelled", run.data.tags


def test_both_back_up_the_api_recovers_without_a_restart(api_settings, private_redis, mlflow_client, tmp_path):
    settings = _settings(api_settings, tmp_path, redis_url=private_redis.url)
    client = create_app(settings).test_client()
    assert client.post("/trials", json=tiny_trial()).status_code == 202
    private_redis.stop()
    response, elapsed = timed_post(client, "/trials", json=tiny_trial())
    assert_503(response, elapsed)
    assert client.get("/readyz").status_code == 503

    private_redis.start()
    response = client.post("/trials", json=tiny_trial())
    assert response.status_code == 202, response.get_json()
    assert client.get("/readyz").status_code == 200
    assert queued_task_ids(private_redis.client()) == {response.get_json()["id"]}


def test_a_stalled_redis_answers_within_seconds_and_strands_no_run(api_settings, private_redis, mlflow_client, tmp_path):
    settings = _settings(api_settings, tmp_path, redis_url=private_redis.url)
    client = create_app(settings).test_client()
    assert client.post("/trials", json=tiny_trial()).status_code == 202  # connections open before the stall
    answers: list[tuple[int, float]] = []
    pause_ms = 8000
    private_redis.client().execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
    t_pause = time.monotonic()
    for headers in ({}, {"Idempotency-Key": uuid.uuid4().hex}, {}):
        response, elapsed = timed_post(client, "/trials", json=tiny_trial(), headers=headers)
        answers.append((response.status_code, elapsed))
    assert all(status in (202, 503) and elapsed < QUICK_S for status, elapsed in answers), answers
    assert any(status == 503 for status, _ in answers), f"the stall ({pause_ms} ms) outlasted none of the requests: {answers}"

    time.sleep(max(0.0, pause_ms / 1000 - (time.monotonic() - t_pause)) + 1)
    sent = queued_task_ids(private_redis.client())
    for run in runs_of(mlflow_client, settings.experiment):
        if run.info.status == "SCHEDULED":
            assert run.info.run_id in sent, f"run {run.info.run_id} is queued with no message"
        else:
            assert run.info.status == "FAILED" and run.data.tags[TAG.REASON].startswith("not dispatched:"), run.data.tags
    response = client.post("/trials", json=tiny_trial())  # and it recovers by itself
    assert response.status_code == 202, response.get_json()


def test_cancel_ends_an_orphaned_running_trial_and_range_test_at_once(app, client, mlflow_client):
    s = app.extensions["convtune"]
    trial = client.post("/trials", json=tiny_trial(queue="gpu")).get_json()  # no worker listens on gpu
    test = client.post("/lr-finder", json={"trial": tiny_trial(queue="gpu"), "steps": 40}).get_json()
    for run_id in (trial["id"], test["id"]):
        runs.start_run(s.runs.client, run_id, {TAG.ATTEMPTS: "1"})  # started by a worker that then died: no lease
    response = client.post(f"/trials/{trial['id']}/cancel")
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled", response.get_json()
    response = client.post(f"/lr-finder/{test['id']}/cancel")
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled", response.get_json()
    assert "no worker held it" in mlflow_client.get_run(trial["id"]).data.tags[TAG.REASON]


def test_cancel_leaves_a_running_trial_with_a_live_lease_to_its_worker(app, client, redis_url):
    s = app.extensions["convtune"]
    trial = client.post("/trials", json=tiny_trial(queue="gpu")).get_json()
    runs.start_run(s.runs.client, trial["id"], {TAG.ATTEMPTS: "1"})
    r = redis.Redis.from_url(redis_url)
    r.set(lease_key(trial["id"]), "a-live-worker", px=30_000)
    try:
        response = client.post(f"/trials/{trial['id']}/cancel")
        assert response.status_code == 202 and response.get_json()["status"] == "running"  # its worker stops at its next check
    finally:
        r.delete(lease_key(trial["id"]))
        s.runs.end(trial["id"], "KILLED", "cancelled", "test cleanup")


def test_a_study_whose_running_trial_lost_its_worker_is_cancelled_at_once(api_settings, private_redis, mlflow_client, tmp_path):
    import optuna

    from models.store.search import USER_ATTR, open_storage

    settings = _settings(api_settings, tmp_path, redis_url=private_redis.url)
    client = create_app(settings).test_client()
    study = client.post("/studies", json=study_body()).get_json()
    # What a step that died mid-trial leaves: a RUNNING Optuna trial, its child run RUNNING, no lease.
    stored = optuna.load_study(study_name=study["id"], storage=open_storage(settings.study_storage))
    trial = stored.ask()
    child = runs.create_run(mlflow_client, mlflow_client.get_run(study["id"]).info.experiment_id, name="orphan", tags={TAG.KIND: KIND.TRIAL, TAG.PARENT: study["id"]})
    runs.start_run(mlflow_client, child)
    stored._storage.set_trial_user_attr(trial._trial_id, USER_ATTR.TRIAL_ID, child)
    runs.start_run(mlflow_client, study["id"])

    response = client.post(f"/studies/{study['id']}/cancel")
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["state"] == "cancelled"
    assert mlflow_client.get_run(child).data.tags[TAG.OUTCOME] == "cancelled"
    assert stored._storage.get_trial(trial._trial_id).state.name == "FAIL"
