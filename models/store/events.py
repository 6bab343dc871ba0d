"""A run's events in a Redis stream: what the workers did, for clients that follow a run without polling MLflow.

MLflow stays the record (ARCHITECTURE.md, decision 2); the stream is only transport. It may miss an
event (a publish that failed, Redis restarted without persistence, a run ended by the API or the
reconciler), so a reader never takes it for the state: the API's event stream starts with a snapshot
read from MLflow and reads MLflow again whenever the stream stays quiet (``service.api.events``).

One stream per run, ``convtune:events:<run_id>`` (:func:`models.store.keys.events_key`): a trial's,
a range test's, or a study's (its parent run's id). Each entry holds ``kind`` and ``data`` (JSON);
its stream id (``1733620000000-0``) is the event's id, which a client hands back to resume after it.
A stream keeps about :data:`MAX_EVENTS` entries (trimmed approximately, which is cheap) and expires
:data:`EVENTS_TTL_S` after its last event.

The kinds:

    status          the run started: status ("running"), attempt
    epoch           a trial finished an epoch: epoch, metrics
    trial_started   (a study's stream) a trial started: trial_id, number, params
    trial_ended     (a study's stream) a trial ended: trial_id, number, outcome, reason, value
    ended           the run ended: status (a study's: state), outcome, reason; nothing follows it

Publishing is best effort and cheap: one round trip (XADD and EXPIRE pipelined), never raised to the
caller, a failure logged at most once a minute per process. A publish waits at most the client's
socket timeout, as every other Redis call of a worker does.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from models.store.keys import events_key

__all__ = [
    "ENDED", "EPOCH", "EVENTS_TTL_S", "EVENT_ID", "KINDS", "MAX_EVENTS", "STATUS", "TRIAL_ENDED", "TRIAL_STARTED",
    "Event", "EventLog", "finite",
]

log = logging.getLogger(__name__)

STATUS, EPOCH, TRIAL_STARTED, TRIAL_ENDED, ENDED = "status", "epoch", "trial_started", "trial_ended", "ended"
KINDS = (STATUS, EPOCH, TRIAL_STARTED, TRIAL_ENDED, ENDED)
MAX_EVENTS = 5000  # about: a trial of 1,000 epochs and a study of 2,000 trials fit
EVENTS_TTL_S = 7 * 24 * 3600
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")  # a Redis stream id, as a client sends it back (Last-Event-ID)
WARN_EVERY_S = 60.0

_warned_at = 0.0
_warn_lock = threading.Lock()


@dataclass(frozen=True)
class Event:
    """One event of a run: its stream id, its kind and its data."""

    id: str
    kind: str
    data: dict[str, Any]


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (a diverged loss) made None: JSON has no word for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class EventLog:
    """The event streams of runs in one Redis: the workers publish, the API reads."""

    def __init__(self, client: redis.Redis, max_events: int = MAX_EVENTS, ttl_s: int = EVENTS_TTL_S):
        self.redis = client
        self.max_events = max_events
        self.ttl_s = ttl_s

    def publish(self, run_id: str, kind: str, data: dict[str, Any]) -> str | None:
        """Add an event to ``run_id``'s stream; its id, or None when Redis did not take it (logged, never raised)."""
        key = events_key(run_id)
        try:
            body = json.dumps(finite(data), separators=(",", ":"), default=str)
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(key, {"kind": kind, "data": body}, maxlen=self.max_events, approximate=True)
            pipe.expire(key, self.ttl_s)
            event_id, _ = pipe.execute()
        except (redis.RedisError, OSError, TypeError, ValueError) as exc:
            _warn_once_a_minute(run_id, kind, exc)
            return None
        return _text(event_id)

    def after(self, run_id: str, last_id: str, count: int = 100, block_ms: int | None = None) -> list[Event]:
        """The events of ``run_id`` after ``last_id`` ("0-0": from the first), oldest first, at most ``count``.

        ``block_ms``: wait up to that long for one when there is none yet (XREAD BLOCK; the client's socket
        timeout must be longer). Raises RedisError.
        """
        answer = self.redis.xread({events_key(run_id): last_id}, count=count, block=block_ms)
        if not answer:
            return []
        # redis-py answers a list of [stream, entries] (RESP2) or a dict of stream -> [entries] (RESP3).
        entries = next(iter(answer.values()))[0] if isinstance(answer, dict) else answer[0][1]
        return [_event(event_id, fields) for event_id, fields in entries]

    def all(self, run_id: str) -> list[Event]:
        """Every event ``run_id``'s stream holds, oldest first. Raises RedisError."""
        return [_event(event_id, fields) for event_id, fields in self.redis.xrange(events_key(run_id))]


def _event(event_id: Any, fields: dict[Any, Any]) -> Event:
    decoded = {_text(k): _text(v) for k, v in fields.items()}
    try:
        data = json.loads(decoded.get("data") or "{}")
    except ValueError:
        data = {}
    return Event(_text(event_id), decoded.get("kind", ""), data if isinstance(data, dict) else {"value": data})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _warn_once_a_minute(run_id: str, kind: str, exc: BaseException) -> None:
    global _warned_at
    with _warn_lock:
        now = time.monotonic()
        if _warned_at and now - _warned_at < WARN_EVERY_S:
            return
        _warned_at = now
    log.warning("run %s: its %s event was not published (clients following it read MLflow instead): %s", run_id, kind, exc)
