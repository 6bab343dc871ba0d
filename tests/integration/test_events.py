"""Following work as server-sent events, with a real worker, mlflow server and Redis behind the real app.

A trial's events arrive in order (snapshot, running, each epoch, ended); a dropped stream resumes
after its Last-Event-ID with nothing missed or repeated; another team's trial is a 404; a study's
stream shows its trials start and end. And what streams save: MLflow requests per followed trial,
polling against events (the API runs in-process, so its MLflow calls are counted where they leave).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from models.store.events import EventLog
from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from service.client import ConvtuneClient, Event, parse_sse
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

SECRETS = {name: f"ct_events_{name}_{uuid.uuid4().hex}" for name in ("ana", "bob")}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture(scope="module")
def events_app(api_settings: ApiSettings, worker_env: dict[str, str]):
    tokens = [TokenConfig(name=name, sha256=hash_token(secret), scopes=["read", "submit"]) for name, secret in SECRETS.items()]
    return create_app(api_settings.model_copy(update={
        "auth_disabled": False, "auth_tokens": tokens, "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],
        "events_keepalive_s": 2, "events_max_streams": 4,
    }))


@pytest.fixture()
def api(events_app):
    return events_app.test_client()


def submit(api, path: str, body: dict[str, Any], who: str = "ana") -> str:
    response = api.post(path, json=body, headers=bearer(who))
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def stream(api, path: str, who: str = "ana", last_event_id: str | None = None) -> Iterator[Event]:
    """The events of one connection, as they come (the test client streams the app's generator)."""
    headers = {**bearer(who), "Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    response = api.get(path, headers=headers, buffered=False)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    try:
        yield from (e for e in parse_sse(_lines(response.response)) if e is not None)
    finally:
        response.close()  # what a dropped connection does: the server closes its generator


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        *lines, buffer = buffer.split("\n")
        yield from lines


def test_a_trial_s_events_arrive_in_order_and_the_stream_ends_after_ended(api, worker):
    trial_id = submit(api, "/trials", tiny_trial(optim={"epochs": 4}))
    events = list(stream(api, f"/trials/{trial_id}/events"))
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot" and events[0].data["id"] == trial_id and events[0].id is None
    assert kinds[1:] == ["status", "epoch", "epoch", "epoch", "epoch", "ended"], kinds
    assert [e.data["epoch"] for e in events if e.kind == "epoch"] == [1, 2, 3, 4]
    assert {"val_accuracy", "val_loss"} <= set(events[2].data["metrics"])
    assert events[-1].data["status"] == "succeeded" and events[-1].data["outcome"] == "succeeded"
    ids = [e.id for e in events[1:]]
    assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # An ended trial's stream replays everything at once and ends.
    again = list(stream(api, f"/trials/{trial_id}/events"))
    assert [e.id for e in again[1:]] == ids and again[0].data["status"] == "succeeded"


def test_a_dropped_stream_resumes_after_its_last_event_id_with_no_duplicate_and_no_gap(api, worker):
    trial_id = submit(api, "/trials", tiny_trial(optim={"epochs": 5}))
    seen: list[Event] = []
    for event in stream(api, f"/trials/{trial_id}/events"):
        seen.append(event)
        if event.kind == "epoch" and event.data["epoch"] == 2:
            break  # the connection drops here
    last = seen[-1].id
    rest = list(stream(api, f"/trials/{trial_id}/events", last_event_id=last))
    assert rest[0].kind == "snapshot"
    got = [e.id for e in seen[1:] + rest[1:]]
    everything = [e.id for e in EventLog(redis.Redis.from_url(api.application.extensions["convtune"].settings.redis_url)).all(trial_id)]
    assert got == everything and len(set(got)) == len(got)
    assert rest[-1].kind == "ended" and [e.data["epoch"] for e in rest if e.kind == "epoch"] == [3, 4, 5]
    # The query parameter does what the header does.
    by_query = list(stream(api, f"/trials/{trial_id}/events?last_event_id={last}"))
    assert [e.id for e in by_query[1:]] == [e.id for e in rest[1:]]


def test_another_team_s_trial_is_a_404_and_a_bad_last_event_id_a_422(api):
    trial_id = submit(api, "/trials", tiny_trial(queue="gpu"), who="ana")  # no worker serves gpu here: it stays queued
    hidden = api.get(f"/trials/{trial_id}/events", headers=bearer("bob"))
    missing = api.get(f"/trials/{uuid.uuid4().hex}/events", headers=bearer("bob"))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.mimetype == "application/problem+json" and hidden.get_json()["detail"] == f"no trial with id {trial_id!r}"  # as for an unused id
    assert api.get(f"/studies/{trial_id}/events", headers=bearer("ana")).status_code == 404  # a trial is no study
    bad = api.get(f"/trials/{trial_id}/events", headers={**bearer("ana"), "Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and bad.mimetype == "application/problem+json"
    assert api.get(f"/trials/{trial_id}/events").status_code == 401
    # Cancelled while queued (the API ends it, no worker publishes): the stream says so, from MLflow.
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("ana")).status_code == 202
    events = list(stream(api, f"/trials/{trial_id}/events"))
    assert [e.kind for e in events] == ["snapshot", "ended"] and events[-1].data["status"] == "cancelled"


def test_a_study_s_stream_shows_its_trials_start_and_end(api, worker):
    body = {
        "base": tiny_trial(optim={"epochs": 2}), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "pruner": "none", "n_trials": 2, "parallelism": 1,
    }
    study_id = submit(api, "/studies", body)
    events = list(stream(api, f"/studies/{study_id}/events"))
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "ended", kinds
    assert kinds.count("trial_started") == 2 and kinds.count("trial_ended") == 2, kinds
    started = [e.data for e in events if e.kind == "trial_started"]
    ended = [e.data for e in events if e.kind == "trial_ended"]
    assert [s["number"] for s in started] == [0, 1] and all("optim.lr" in s["params"] for s in started)
    assert {e["trial_id"] for e in ended} == {s["trial_id"] for s in started}
    assert all(e["outcome"] == "succeeded" and isinstance(e["value"], float) for e in ended)
    assert events[-1].data["state"] == "succeeded"


# --- what streams save ---------------------------------------------------------------------------


class Counting:
    """Counts the MLflow REST requests this process makes (the API runs in it; the worker does not)."""

    def __init__(self, monkeypatch):
        import mlflow.utils.rest_utils as rest

        self.count, self.lock, real = 0, threading.Lock(), rest.http_request

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(rest, "http_request", counted)

    def during(self, fn) -> tuple[int, Any, float]:
        before, t0 = self.count, time.monotonic()
        result = fn()
        return self.count - before, result, time.monotonic() - t0


def test_following_a_trial_by_its_events_costs_a_few_mlflow_requests_where_polling_costs_many(events_app, worker, monkeypatch, capsys):
    client = ConvtuneClient("http://api", token=SECRETS["ana"], transport=httpx.WSGITransport(app=events_app))
    counting = Counting(monkeypatch)
    spec = tiny_trial(optim={"epochs": 8})
    measured = {}
    for how, stream_it in (("polling", False), ("events", True)):
        trial_id = client.submit_trial(spec)["id"]
        requests, done, seconds = counting.during(lambda: client.wait_trial(trial_id, stream=stream_it))  # noqa: B023 - called at once
        assert done["status"] == "succeeded" and done["best"]["val_accuracy"]["value"] > 0
        measured[how] = (requests, seconds)
    with capsys.disabled():
        for how, (requests, seconds) in measured.items():
            print(f"\nfollowing one trial by {how}: {requests} MLflow requests from the API in {seconds:.1f}s")
    assert measured["events"][0] <= 6 < measured["polling"][0]
