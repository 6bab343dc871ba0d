"""callback_url: a real worker trains the trial, the callback worker POSTs a signed event (Standard Webhooks) to a real server."""

from __future__ import annotations

import json
import queue
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from models.callbacks import ID_HEADER, verify_signature, webhook_key, webhook_secret
from tests.conftest import TEST_SECRET_KEY, Service, free_port, wait_for
from tests.helpers import tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration

# Authentication is off here (api_settings): callbacks are the default team's, signed with its key.
SECRET = webhook_secret(webhook_key(TEST_SECRET_KEY, None))


class Receiver:
    """A local HTTP server that records every POST; answers ``fail_with`` (503) to the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0, fail_with: int = 503):
        self.received: queue.Queue[tuple[dict[str, str], bytes, int]] = queue.Queue()
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = fail_with if receiver.fail_first > 0 else 204
                receiver.fail_first -= 1
                receiver.received.put((dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/convtune"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout_s: float = 60) -> tuple[dict[str, str], bytes, int]:
        return self.received.get(timeout=timeout_s)


def cancel_a_queued_trial(client, callback_url: str) -> str:
    """Submit a trial no worker takes (no gpu worker here) and cancel it: the API sends its callback."""
    response = client.post("/trials", json=tiny_trial(queue="gpu", callback_url=callback_url))
    assert response.status_code == 202, response.get_json()
    trial_id = response.get_json()["id"]
    assert client.post(f"/trials/{trial_id}/cancel").status_code == 202
    return trial_id


@pytest.fixture(scope="module")
def callback_worker(worker_env: dict[str, str]) -> Iterator[Service]:
    """The light callback worker (workers.callbacks.app), signing with the session's secret key (worker_env), short backoff."""
    # Celery's backoff counts whole seconds: 1 s is the shortest (retry n waits 0 to 2**n s).
    env = {**worker_env, "CONVTUNE_CALLBACK_BACKOFF_S": "1", "CONVTUNE_CALLBACK_MAX_RETRIES": "3"}
    argv = [sys.executable, "-m", "celery", "-A", "workers.callbacks.app", "worker", "-P", "threads", "-c", "2", "-Q", "callbacks",
            "-n", f"callbacks-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    w = Service("callback-worker", argv, env)
    if not wait_for(lambda: " ready." in w.log() or not w.alive(), 60) or not w.alive():
        w.stop()
        pytest.fail(f"callback worker did not start:\n{w.log()[-3000:]}")
    yield w
    w.stop()


def test_callback_arrives_signed_when_the_trial_ends_and_is_retried(client, worker, callback_worker):
    receiver = Receiver(fail_first=1)
    response = client.post("/trials", json=tiny_trial(name="with-callback", callback_url=receiver.url))
    assert response.status_code == 202, response.get_json()
    trial_id = response.get_json()["id"]
    trial = wait_for_trial(client, trial_id)
    assert trial["status"] == "succeeded", trial["reason"]

    headers, body, status = receiver.next()
    assert status == 503  # the first delivery fails ...
    headers2, body2, status2 = receiver.next()
    assert status2 == 204  # ... and the retry, after backoff, is taken
    assert body2 == body and headers2[ID_HEADER] == headers[ID_HEADER] == json.loads(body)["delivery_id"]  # one event, retried
    assert verify_signature(SECRET, headers2, body2, destination=receiver.url)
    assert not verify_signature(webhook_secret(webhook_key("another-secret", None)), headers2, body2)
    assert not verify_signature(SECRET, headers2, body2.replace(b"succeeded", b"failed"))
    event = json.loads(body2)
    assert headers2["X-Convtune-Event"] == event["event"] == "trial.ended"
    assert event["trial"]["id"] == trial_id and event["trial"]["status"] == "succeeded" and event["trial"]["outcome"] == "succeeded"
    assert event["trial"]["name"] == "with-callback" and 0 < event["trial"]["metrics"]["val_accuracy"] <= 1
    # the worker's log lines about this trial are JSON and carry its id
    tagged = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{") and trial_id in line]
    assert any(entry.get("trial_id") == trial_id and entry["process"] == "worker" for entry in tagged)
    # the URL is not an MLflow param
    assert "callback_url" not in client.application.extensions["convtune"].runs.client.get_run(trial_id).data.params


def test_cancelling_a_queued_trial_calls_back_from_the_api(client, callback_worker):
    receiver = Receiver()
    trial_id = cancel_a_queued_trial(client, receiver.url)
    headers, body, status = receiver.next()
    event = json.loads(body)
    assert event["trial"]["id"] == trial_id and event["trial"]["status"] == "cancelled"
    assert verify_signature(SECRET, headers, body, destination=receiver.url)


def test_a_failing_receiver_gets_the_first_delivery_and_max_retries_then_is_given_up(client, callback_worker):
    receiver = Receiver(fail_first=1000)
    cancel_a_queued_trial(client, receiver.url)
    attempts = [receiver.next(timeout_s=30) for _ in range(1 + 3)]  # CONVTUNE_CALLBACK_MAX_RETRIES=3, backoff 1s, 2s, 4s at most
    assert [status for _, _, status in attempts] == [503] * 4
    assert len({headers[ID_HEADER] for headers, _, _ in attempts}) == 1  # one event, retried
    assert wait_for(lambda: "given up after 4 attempts" in callback_worker.log(), 10), callback_worker.log()[-3000:]
    with pytest.raises(queue.Empty):
        receiver.next(timeout_s=3)


def test_a_receiver_that_refuses_the_event_is_not_retried(client, callback_worker):
    receiver = Receiver(fail_first=1000, fail_with=410)
    cancel_a_queued_trial(client, receiver.url)
    assert receiver.next()[2] == 410
    assert wait_for(lambda: "refused with 410" in callback_worker.log(), 10), callback_worker.log()[-3000:]
    with pytest.raises(queue.Empty):
        receiver.next(timeout_s=3)  # a retry would come within 1 s


def test_a_dead_receiver_never_holds_the_worker(client, worker, callback_worker):
    # Nothing listens on this port: deliveries fail and are retried on the callback worker, while
    # the training worker goes straight on to the next trial.
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    first = client.post("/trials", json=tiny_trial(optim={"epochs": 1}, callback_url=dead)).get_json()["id"]
    second = client.post("/trials", json=tiny_trial(optim={"epochs": 1})).get_json()["id"]
    assert wait_for_trial(client, first)["status"] == "succeeded"
    assert wait_for_trial(client, second, timeout_s=60)["status"] == "succeeded"
    assert wait_for(lambda: "failed" in callback_worker.log() and "retry" in callback_worker.log(), 30)


def test_study_callback_arrives_signed_when_the_study_ends(api_settings, worker, worker_env, callback_worker):
    from service.api import create_app

    receiver = Receiver()
    client = create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})).test_client()
    study = {
        "name": "study with callback", "base": tiny_trial(optim={"epochs": 2}), "n_trials": 2, "parallelism": 1, "sampler": {"name": "grid"},
        "search_space": {"optim.lr": {"type": "categorical", "choices": [0.003, 0.01]}}, "callback_url": receiver.url,
    }
    response = client.post("/studies", json=study)
    assert response.status_code == 202, response.get_json()
    study_id = response.get_json()["id"]
    headers, body, status = receiver.next(timeout_s=180)
    assert verify_signature(SECRET, headers, body, destination=receiver.url)
    event = json.loads(body)
    assert headers["X-Convtune-Event"] == event["event"] == "study.ended"
    assert event["study"]["id"] == study_id and event["study"]["state"] == "succeeded"
    assert event["study"]["best"]["trial_id"] and sum(event["study"]["counts"].values()) == 2
    assert client.get(f"/studies/{study_id}").get_json()["state"] == "succeeded"
