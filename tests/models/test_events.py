"""A run's event stream in a real Redis: published in order, resumed after an id, capped, expiring, never raising."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid

import pytest
import redis

from models.store import events as events_module
from models.store.events import ENDED, EPOCH, EVENTS_TTL_S, STATUS, EventLog, finite
from models.store.keys import events_key


@pytest.fixture()
def log_(redis_url: str) -> EventLog:
    return EventLog(redis.Redis.from_url(redis_url))


def test_events_come_back_in_order_with_their_stream_ids(log_: EventLog) -> None:
    run = uuid.uuid4().hex
    ids = [log_.publish(run, STATUS, {"status": "running"}), log_.publish(run, EPOCH, {"epoch": 1, "metrics": {"val_loss": 0.5}})]
    ids.append(log_.publish(run, ENDED, {"status": "succeeded", "outcome": "succeeded", "reason": "done"}))
    got = log_.after(run, "0-0")
    assert [e.id for e in got] == ids and [e.kind for e in got] == [STATUS, EPOCH, ENDED]
    assert got[1].data == {"epoch": 1, "metrics": {"val_loss": 0.5}}
    assert [e.id for e in log_.after(run, ids[0])] == ids[1:]  # resumed after an id: neither it nor a gap
    assert log_.after(run, ids[-1]) == [] and log_.all(run) == got


def test_each_publish_refreshes_the_expiry(log_: EventLog) -> None:
    run = uuid.uuid4().hex
    log_.publish(run, STATUS, {"status": "running"})
    log_.redis.expire(events_key(run), 10)
    log_.publish(run, EPOCH, {"epoch": 1, "metrics": {}})
    assert EVENTS_TTL_S - 5 <= log_.redis.ttl(events_key(run)) <= EVENTS_TTL_S


def test_the_stream_is_capped_about_max_events(redis_url: str) -> None:
    capped = EventLog(redis.Redis.from_url(redis_url), max_events=100)
    run = uuid.uuid4().hex
    for epoch in range(1, 1001):
        capped.publish(run, EPOCH, {"epoch": epoch, "metrics": {}})
    length = capped.redis.xlen(events_key(run))
    assert 100 <= length < 300  # approximate trimming keeps whole nodes
    assert capped.all(run)[-1].data["epoch"] == 1000


def test_a_blocking_read_wakes_at_the_next_event(log_: EventLog) -> None:
    run = uuid.uuid4().hex
    timer = threading.Timer(0.2, lambda: log_.publish(run, EPOCH, {"epoch": 1, "metrics": {}}))
    timer.start()
    t0 = time.monotonic()
    got = log_.after(run, "0-0", block_ms=5000)
    assert [e.kind for e in got] == [EPOCH] and time.monotonic() - t0 < 3
    assert log_.after(run, got[0].id, block_ms=100) == []  # nothing more: the block times out empty


def test_non_finite_metrics_are_sent_as_null(log_: EventLog) -> None:
    run = uuid.uuid4().hex
    log_.publish(run, EPOCH, {"epoch": 3, "metrics": {"loss": math.nan, "val_loss": math.inf, "val_accuracy": 0.5}})
    assert log_.all(run)[0].data["metrics"] == {"loss": None, "val_loss": None, "val_accuracy": 0.5}
    assert finite([1.0, -math.inf, {"a": (math.nan,)}]) == [1.0, None, {"a": [None]}]


def test_publishing_never_raises_and_warns_at_most_once_a_minute(caplog, monkeypatch) -> None:
    monkeypatch.setattr(events_module, "_warned_at", 0.0)
    down = EventLog(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2))
    with caplog.at_level(logging.WARNING, logger="models.store.events"):
        assert down.publish("r1", EPOCH, {"epoch": 1}) is None
        assert down.publish("r1", EPOCH, {"epoch": 2}) is None
    assert len([r for r in caplog.records if "not published" in r.message]) == 1
