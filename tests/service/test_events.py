"""Server-sent events: the wire format, one stream's course over a real Redis, and the client that follows it."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from models.store.events import ENDED, EPOCH, STATUS, EventLog
from service.api.events import Followed, comment, follow, sse
from service.client import ConvtuneClient, Event, merge_event, parse_sse

RUNNING = {"id": "t", "status": "running", "epochs_done": 0, "epochs": 3, "metrics": {}}
ENDED_DOC = {"id": "t", "status": "succeeded", "outcome": "succeeded", "reason": "trained 3 epochs"}


# --- the wire format -------------------------------------------------------------------------------


def test_an_event_is_id_event_and_one_line_of_json():
    text = sse("epoch", {"epoch": 2, "metrics": {"loss": float("nan")}, "note": "a\nb"}, "1-0")
    assert text.endswith("\n\n") and text.count("\n") == 4
    lines = text.splitlines()
    assert lines[0] == "id: 1-0" and lines[1] == "event: epoch"
    assert json.loads(lines[2].removeprefix("data: ")) == {"epoch": 2, "metrics": {"loss": None}, "note": "a\nb"}
    assert sse("snapshot", {"a": 1}).startswith("event: snapshot\n")  # no id: the client's last id stays
    assert comment("keep-alive") == ": keep-alive\n\n"


def test_the_client_parses_what_the_api_writes():
    text = "retry: 1000\n\n" + sse("snapshot", RUNNING) + comment("keep-alive") + sse("epoch", {"epoch": 1}, "5-0") + "data: {\"a\":\ndata: 1}\n\n"
    parsed = list(parse_sse(text.split("\n")))
    assert parsed == [Event(None, "snapshot", RUNNING), None, Event("5-0", "epoch", {"epoch": 1}), Event(None, "message", {"a": 1})]


def test_events_merge_into_the_document_a_progress_display_shows():
    after = merge_event(RUNNING, Event("1-0", "epoch", {"epoch": 2, "metrics": {"val_accuracy": 0.9}}))
    assert after["epochs_done"] == 2 and after["metrics"] == {"val_accuracy": 0.9} and after["status"] == "running"
    assert merge_event(after, Event("2-0", "ended", ENDED_DOC))["status"] == "succeeded"
    study = {"id": "s", "state": "running", "progress": {"finished": 1, "running": 0, "n_trials": 4}}
    study = merge_event(study, Event("3-0", "trial_started", {"trial_id": "x", "number": 1}))
    assert study["progress"] == {"finished": 1, "running": 1, "n_trials": 4}
    study = merge_event(study, Event("4-0", "trial_ended", {"trial_id": "x", "number": 1, "outcome": "succeeded", "value": 0.9}))
    assert study["progress"] == {"finished": 2, "running": 0, "n_trials": 4}


# --- one stream's course, over a real Redis --------------------------------------------------------


@pytest.fixture()
def store(redis_url: str) -> EventLog:
    return EventLog(redis.Redis.from_url(redis_url, socket_timeout=10))


def parsed(chunks: Iterator[str]) -> list[Event | None]:
    return list(parse_sse("".join(chunks).split("\n")))


def followed(run_id: str, terminal: bool = False, reread: Any = None) -> Followed:
    return Followed(run_id, ENDED_DOC if terminal else RUNNING, terminal, reread or (lambda: (RUNNING, False)))


def test_a_stream_sends_the_snapshot_then_the_events_and_ends_after_ended(store: EventLog):
    run = uuid.uuid4().hex
    ids = [store.publish(run, STATUS, {"status": "running"}), store.publish(run, EPOCH, {"epoch": 1}), store.publish(run, ENDED, ENDED_DOC)]
    got = parsed(follow(store, followed(run), None, keepalive_s=1, max_s=10))
    assert [e.kind for e in got] == ["snapshot", STATUS, EPOCH, ENDED] and [e.id for e in got[1:]] == ids
    resumed = parsed(follow(store, followed(run), ids[0], keepalive_s=1, max_s=10))
    assert [e.id for e in resumed[1:]] == ids[1:]  # after Last-Event-ID: no duplicate, no gap


def test_an_ended_run_without_its_event_gets_one_made_from_mlflow(store: EventLog):
    run = uuid.uuid4().hex
    store.publish(run, STATUS, {"status": "running"})
    got = parsed(follow(store, followed(run, terminal=True), None, keepalive_s=1, max_s=10))
    assert [e.kind for e in got] == ["snapshot", STATUS, ENDED]
    assert got[-1].id is None and got[-1].data == {"status": "succeeded", "outcome": "succeeded", "reason": "trained 3 epochs"}


def test_a_quiet_stream_keeps_alive_and_notices_an_ending_in_mlflow(store: EventLog):
    run, reads = uuid.uuid4().hex, []

    def reread():
        reads.append(1)
        return (ENDED_DOC, True) if len(reads) >= 2 else (RUNNING, False)

    got = parsed(follow(store, followed(run, reread=reread), None, keepalive_s=0.2, max_s=10))
    assert [None if e is None else e.kind for e in got] == ["snapshot", None, ENDED] and len(reads) == 2


def test_a_stream_closes_at_its_longest_time(store: EventLog):
    run, now = uuid.uuid4().hex, [0.0]

    def clock() -> float:
        now[0] += 0.4
        return now[0]

    got = parsed(follow(store, followed(run), None, keepalive_s=0.1, max_s=1, clock=clock))
    assert got[0].kind == "snapshot" and all(e is None for e in got[1:]) and len(got) <= 4


# --- the client following a stream -----------------------------------------------------------------


class Dropping(httpx.SyncByteStream):
    """A response body that sends ``text`` and then loses its connection."""

    def __init__(self, text: str):
        self.text = text

    def __iter__(self) -> Iterator[bytes]:
        yield self.text.encode()
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def client_over(handle) -> ConvtuneClient:
    client = ConvtuneClient("http://api", transport=httpx.MockTransport(handle))
    client.sleep = lambda s: None
    return client


def test_the_client_reconnects_with_the_last_id_after_a_drop_and_ends_with_one_get():
    seen: list[tuple[str, str | None]] = []
    first = sse("snapshot", RUNNING) + sse(STATUS, {"status": "running"}, "1-0") + sse(EPOCH, {"epoch": 1, "metrics": {"val_accuracy": 0.5}}, "2-0")
    second = sse("snapshot", RUNNING) + sse(EPOCH, {"epoch": 2, "metrics": {"val_accuracy": 0.7}}, "3-0") + sse(ENDED, ENDED_DOC, "4-0")

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("Last-Event-ID")))
        if request.url.path.endswith("/events"):
            if len(seen) == 1:
                return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=Dropping(first))
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, text=second)
        return httpx.Response(200, json={**ENDED_DOC, "best": {"val_accuracy": {"value": 0.7, "epoch": 2}}})

    updates: list[dict] = []
    done = client_over(handle).wait_trial("t", on_update=updates.append)
    assert seen == [("/trials/t/events", None), ("/trials/t/events", "2-0"), ("/trials/t", None)]
    assert done["best"]["val_accuracy"]["value"] == 0.7
    assert [u.get("epochs_done") for u in updates if u.get("status") == "running"] == [0, 0, 1, 0, 2]


def test_the_client_polls_an_api_without_event_streams():
    seen: list[str] = []
    answers = iter([{**RUNNING}, {**RUNNING, "epochs_done": 2}, ENDED_DOC])

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"type": "x", "title": "Not Found", "status": 404, "detail": "no such route"})
        return httpx.Response(200, json=next(answers))

    done = client_over(handle).wait_trial("t", poll_s=0)
    assert done == ENDED_DOC and seen == ["/trials/t/events", "/trials/t", "/trials/t", "/trials/t"]


def test_the_cli_shows_each_epoch_as_its_event_comes(capsys):
    from service.cli.follow import Progress

    body = sse("snapshot", {**RUNNING, "status": "queued"}) + sse(STATUS, {"status": "running"}, "1-0")
    body += "".join(sse(EPOCH, {"epoch": n, "metrics": {"val_accuracy": 0.5 + n / 10}}, f"{n + 1}-0") for n in (1, 2, 3)) + sse(ENDED, ENDED_DOC, "5-0")

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, text=body)
        return httpx.Response(200, json={**ENDED_DOC, "epochs_done": 3, "epochs": 3})

    with Progress("trial", "trial", tty=False) as progress:
        client_over(handle).wait_trial("t", on_update=progress.update)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("(")[-1] for line in lines if "running" in line] == ["0/3 epochs)", "1/3 epochs)", "2/3 epochs)", "3/3 epochs)"]
    assert "val_accuracy 0.8000" in lines[-2] and "succeeded" in lines[-1]


def test_a_reopened_runs_past_ending_does_not_end_a_follower_of_its_new_life(store: EventLog):
    """A study extended after it ended runs again: a follower without Last-Event-ID sees this life only."""
    run = uuid.uuid4().hex
    store.publish(run, STATUS, {"status": "running"})
    store.publish(run, ENDED, ENDED_DOC)
    time.sleep(0.01)
    reopened_at = int(time.time() * 1000)
    again = store.publish(run, STATUS, {"status": "running"})
    later = Followed(run, RUNNING, False, lambda: (RUNNING, False), reopened_at)
    stream = follow(store, later, None, keepalive_s=0.3, max_s=1)
    got = [e for e in parsed(stream) if e is not None]
    assert [e.kind for e in got] == ["snapshot", STATUS] and got[1].id == again  # no past ended; it waits for this life's
