"""Heartbeats with a real Celery worker: its beat names its queue and the messages it holds, the
API refuses work for a queue no worker serves, and a worker killed whole stops beating within BEAT_TTL_S.

The module has its own Redis database, so that only its worker beats there (the session's workers serve
``cpu``, and some tests start ``gpu`` ones), and its own experiment; the worker's reconciler is off, so it
never sweeps the session's runs against this database's queues.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from models.messages import TASK_RUN_TRIAL, TrialMessage, celery_config
from models.store import fleet
from service.api import create_app
from tests.conftest import Service, start_worker, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

FLEET_REDIS_DB = 12


@pytest.fixture(scope="module")
def fleet_redis_url(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + f"/{FLEET_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()  # the ETA message the killed worker held, left unacked


@pytest.fixture(scope="module")
def fleet_worker(worker_env: dict[str, str], fleet_redis_url: str) -> Iterator[Service]:
    env = {**worker_env, "CONVTUNE_REDIS_URL": fleet_redis_url, "CONVTUNE_UNSERVED_QUEUE_S": "900", "CONVTUNE_RECONCILE_INTERVAL_S": "0"}
    w = start_worker("fleet-worker", env, queue="cpu")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def checked_api(api_settings, fleet_redis_url: str):
    """The real app with the check on (the product's default, 15 min), on the module's Redis."""
    settings = api_settings.model_copy(update={"redis_url": fleet_redis_url, "unserved_queue_s": 900, "experiment": f"fleet-{uuid.uuid4().hex[:8]}"})
    return create_app(settings).test_client()


def _beat_of(client: redis.Redis, worker: Service) -> fleet.WorkerBeat | None:
    name = next(part for part in worker.argv if part.startswith("fleet-worker-")).replace("%h", "")
    return next((b for b in fleet.live_workers(client) if b.name.startswith(name)), None)


def test_a_worker_beats_its_queue_and_what_it_holds_the_api_refuses_other_queues_and_a_killed_worker_lapses(
    fleet_worker: Service, fleet_redis_url: str, checked_api,
):
    client = redis.Redis.from_url(fleet_redis_url)
    assert wait_for(lambda: _beat_of(client, fleet_worker) is not None, 15), fleet_worker.log()[-3000:]
    assert _beat_of(client, fleet_worker).queues == {"cpu"}

    # A message it holds waiting for its ETA (as a retry's countdown does): in its beat within a beat or two.
    sender = Celery("fleet-test-sender", set_as_current=False)
    sender.conf.update(celery_config(fleet_redis_url, 3600, socket_timeout_s=5, sender=True))
    held_id = f"fleet-test-{uuid.uuid4().hex}"
    message = TrialMessage(trial_id=held_id, spec=tiny_trial())
    sender.send_task(TASK_RUN_TRIAL, kwargs={"message": message.model_dump(mode="json")}, queue="cpu", task_id=held_id, countdown=3600)
    assert wait_for(lambda: held_id in (_beat_of(client, fleet_worker) or fleet.WorkerBeat("", frozenset(), frozenset(), 0)).held, 3 * fleet.BEAT_S)
    assert held_id in fleet.held_task_ids(client)

    # Nothing serves gpu: every route that creates work says so, naming the field and the queues served.
    for path, body, field in (
        ("/trials", tiny_trial(queue="gpu"), "queue"),
        ("/lr-finder", {"trial": tiny_trial(queue="gpu"), "steps": 20}, "trial.queue"),
        ("/studies", {"base": tiny_trial(queue="gpu"), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
                      "n_trials": 2}, "base.queue"),
    ):
        response = checked_api.post(path, json=body)
        assert response.status_code == 422 and response.mimetype == "application/problem+json", (path, response.get_json())
        (error,) = response.get_json()["errors"]
        assert error["field"] == field
        assert "no worker has served queue 'gpu' in the last 15 min" in error["message"] and "the queues served now: cpu" in error["message"], error
    accepted = checked_api.post("/trials", json=tiny_trial(queue="cpu"))  # its worker's queue is served
    assert accepted.status_code == 202, accepted.get_json()
    checked_api.post(f"/trials/{accepted.get_json()['id']}/cancel")
    metrics = checked_api.get("/metrics").get_data(as_text=True)
    assert 'convtune_queue_served{queue="cpu"} 1.0' in metrics and 'convtune_queue_served{queue="gpu"} 0.0' in metrics

    # Killed whole (its process group, SIGKILL): no goodbye, its beat lapses within BEAT_TTL_S.
    fleet_worker.stop(signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(lambda: _beat_of(client, fleet_worker) is None, fleet.BEAT_TTL_S + 2, interval_s=0.5)
    lapsed_s = time.monotonic() - killed
    assert lapsed_s <= fleet.BEAT_TTL_S + 1, lapsed_s
    assert held_id not in fleet.held_task_ids(client)
    # Its queue stays served for CONVTUNE_UNSERVED_QUEUE_S: a worker restarting does not turn work away.
    assert fleet.served_queues(client, ["cpu"]) == {"cpu"}
    assert checked_api.post("/trials", json=tiny_trial(queue="gpu")).status_code == 422


def test_until_any_worker_has_beaten_work_is_accepted_then_only_for_the_queues_served(
    checked_api, api_settings, fleet_redis_url: str, monkeypatch: pytest.MonkeyPatch,
):
    prefix = f"test:{uuid.uuid4().hex}:"  # a fleet of this test's own: no record of any worker yet
    monkeypatch.setattr(fleet, "_PREFIX", prefix + "worker:")
    monkeypatch.setattr(fleet, "_SERVED_PREFIX", prefix + "queue:")
    monkeypatch.setattr(fleet, "_LAST_SERVED_KEY", prefix + "last_served")
    client = redis.Redis.from_url(fleet_redis_url)

    def submit(api, **spec) -> int:
        response = api.post("/trials", json=tiny_trial(**spec))
        if response.status_code == 202:
            api.post(f"/trials/{response.get_json()['id']}/cancel")  # nothing would run it
        return response.status_code

    # A new deployment (or Redis restarted empty): the workers' first beats are seconds away.
    assert submit(checked_api, queue="gpu") == 202
    fleet.beat(client, "cpu0@test", ["cpu"], [], served_ttl_s=900)
    assert submit(checked_api, queue="gpu") == 422
    assert submit(checked_api, queue="cpu") == 202 and submit(checked_api) == 202  # the service's default (cpu here) is served
    settings = checked_api.application.extensions["convtune"].settings
    unchecked = create_app(settings.model_copy(update={"unserved_queue_s": 0})).test_client()
    assert submit(unchecked, queue="gpu") == 202  # 0 turns the check off
    default_gpu = create_app(settings.model_copy(update={"default_queue": "gpu"})).test_client()
    refused = default_gpu.post("/trials", json=tiny_trial())
    assert refused.status_code == 422 and refused.get_json()["errors"][0]["field"] == "queue"
    assert "queue 'gpu' (this service's default, CONVTUNE_DEFAULT_QUEUE)" in refused.get_json()["errors"][0]["message"]
    down = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})).test_client()
    unavailable = down.post("/trials", json=tiny_trial(queue="cpu"))
    assert unavailable.status_code == 503 and "Retry-After" in unavailable.headers  # Redis down: as every submit
