"""Following a trial, a study or a range test as server-sent events, instead of polling GET.

    GET /trials/{id}/events      snapshot, status (running), epoch ..., ended
    GET /studies/{id}/events     snapshot, status, trial_started, trial_ended ..., ended
    GET /lr-finder/{id}/events   snapshot, status, ended

Each event is ``id:`` (its Redis stream id, :mod:`models.store.events`), ``event:`` (its kind) and
``data:`` (JSON). The first is a ``snapshot`` without an id: the run as GET shows it, read from
MLflow once. Then come the stream's events after ``Last-Event-ID`` (the header, or
``?last_event_id=``), from the first without one, as they happen (XREAD BLOCK). The stream ends
after ``ended``. A stream quiet for ``events_keepalive_s`` sends a ``: keep-alive`` comment (proxies
keep the connection) and reads the run from MLflow once: a run that ended without its event (the
API cancelled it while queued, the reconciler ended it, a publish was lost) gets an ``ended`` made
from that read, without an id. A stream is closed after ``events_max_s``; the client reconnects
with the last id it saw and misses nothing.

Threads: under gunicorn's gthread workers an open stream holds one of its process's threads
(``CONVTUNE_GUNICORN_THREADS``) for its whole life, mostly asleep in Redis. A process serves at most
``events_max_streams`` streams at once (503 beyond, and clients fall back to polling), so that its
other threads stay free for everything else. Each stream also holds one Redis connection of its own.
The same visibility rules as GET apply: another team's id is a 404.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from flask import Response, current_app, stream_with_context
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from models.store.events import ENDED, EVENT_ID, Event, EventLog, finite
from models.store.runs import KIND
from service.api.errors import ServiceUnavailable
from service.api.lr_finder import WHAT as RANGE_TEST
from service.api.lr_finder import LrFinderPath, range_test_public
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.schemas import TrialPath
from service.api.settings import ApiSettings
from service.api.studies.schemas import StudyPath
from service.api.studies.views import study_public, study_store
from service.api.trials import trial_public
from service.api.wiring import services

__all__ = ["EventStreams", "EventsHeader", "EventsQuery", "Followed", "bp", "comment", "follow", "sse"]

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
SNAPSHOT = "snapshot"
RECONNECT_MS = 1000  # the ``retry:`` a browser's EventSource waits before it reconnects
ENDED_FIELDS = ("status", "state", "outcome", "reason")
STREAM_RESPONSE = {
    "description": (
        "Server-sent events (text/event-stream): a `snapshot` (the run as GET shows it, no id), then the run's events "
        "in order, each with `id:` (resume after it with Last-Event-ID), `event:` (its kind) and `data:` (JSON); "
        "`: keep-alive` comments while it is quiet. The stream ends after the `ended` event, or after the API's "
        "longest stream time (reconnect with Last-Event-ID)."
    ),
    "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
}

bp = APIBlueprint("events", __name__, abp_security=BEARER, abp_responses=PROTECTED_ERRORS)


class EventsQuery(BaseModel):
    last_event_id: str | None = Field(
        default=None, pattern=EVENT_ID.pattern, description="Send the events after this one (as the Last-Event-ID header does, which wins).",
    )


class EventsHeader(BaseModel):
    last_event_id: str | None = Field(
        default=None, alias="Last-Event-ID", pattern=EVENT_ID.pattern,
        description="The id of the last event the client saw: the stream resumes after it. Without it: from the first event.",
    )


# --- the wire format ----------------------------------------------------------------------------


def sse(kind: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event: ``id:`` (when given), ``event:``, ``data:`` as one line of JSON, and the blank line that ends it."""
    head = f"id: {event_id}\n" if event_id else ""
    body = json.dumps(finite(data), separators=(",", ":"), default=str)  # one line: json.dumps escapes every newline
    return f"{head}event: {kind}\ndata: {body}\n\n"


def comment(text: str) -> str:
    """A comment line, which clients ignore and proxies see as traffic."""
    return f": {text}\n\n"


# --- following one run ----------------------------------------------------------------------------


@dataclass
class Followed:
    """A run to follow: its id, its state as GET shows it (read once), and how to read that state again (one MLflow read)."""

    run_id: str
    snapshot: dict[str, Any]
    terminal: bool
    reread: Callable[[], tuple[dict[str, Any], bool]]
    read_at_ms: int | None = None  # when the snapshot was read (Unix ms): an ``ended`` before it is a past life's


def follow(
    store: EventLog, followed: Followed, after: str | None, *, keepalive_s: float, max_s: float, clock: Callable[[], float] = time.monotonic,
) -> Iterator[str]:
    """The text of one event stream (see the module's doc); ends after ``ended`` or after ``max_s``.

    A Redis error ends the stream early (the client reconnects with its last id, or polls).
    """
    deadline = clock() + max_s
    cursor = after or "0-0"
    yield f"retry: {RECONNECT_MS}\n\n"
    if after is None and not followed.terminal and followed.read_at_ms is not None:
        cursor = _current_life(store, followed.run_id, followed.read_at_ms)
    yield sse(SNAPSHOT, followed.snapshot)
    try:
        if followed.terminal:
            yield from _finish(store, followed.run_id, cursor, followed.snapshot)
            return
        while True:
            left = deadline - clock()
            if left <= 0:
                return  # the client reconnects with the last id it saw
            batch = store.after(followed.run_id, cursor, block_ms=max(1, int(min(keepalive_s, left) * 1000)))
            for event in batch:
                cursor = event.id
                yield sse(event.kind, event.data, event.id)
                if event.kind == ENDED:
                    return
            if batch:
                continue
            current, ended = _reread(followed)
            if ended:
                yield from _finish(store, followed.run_id, cursor, current)
                return
            yield comment("keep-alive")
    except redis.RedisError as exc:
        log.warning("event stream of run %s ended early: Redis did not answer: %s", followed.run_id, exc)


def _current_life(store: EventLog, run_id: str, read_at_ms: int) -> str:
    """Where the events of a run's current life start: after the last ``ended`` before its snapshot, which shows it running.

    A study extended after it ended runs again: its first life's ``ended`` must not end a follower of
    its second. An ``ended`` after the snapshot was read is this life's, and is kept.
    """
    start = "0-0"
    try:
        for event in _rest(store, run_id, "0-0"):
            if event.kind == ENDED and event.id and int(event.id.split("-")[0]) < read_at_ms:
                start = event.id
    except redis.RedisError:
        pass  # the stream's reads fail the same way and end it
    return start


def _finish(store: EventLog, run_id: str, cursor: str, current: dict[str, Any]) -> Iterator[str]:
    """The events of an ended run left after ``cursor``, then an ``ended`` made from ``current`` unless the stream had one."""
    for event in _rest(store, run_id, cursor):
        yield sse(event.kind, event.data, event.id)
        if event.kind == ENDED:
            return
    yield sse(ENDED, {k: current.get(k) for k in ENDED_FIELDS if k in current})


def _rest(store: EventLog, run_id: str, cursor: str) -> Iterator[Event]:
    while True:
        batch = store.after(run_id, cursor, count=500)
        if not batch:
            return
        yield from batch
        cursor = batch[-1].id


def _reread(followed: Followed) -> tuple[dict[str, Any], bool]:
    try:
        return followed.reread()
    except ServiceUnavailable as exc:  # MLflow down for a moment: the stream goes on, the next quiet spell asks again
        log.info("event stream of run %s: its status could not be read: %s", followed.run_id, exc)
        return followed.snapshot, False


# --- the streams of one process -------------------------------------------------------------------


class EventStreams:
    """The event streams one API process serves: their own Redis client (reads that block) and their cap."""

    def __init__(self, settings: ApiSettings):
        self.settings = settings
        # XREAD BLOCK waits up to keepalive_s: the socket may stay quiet that long plus the usual timeout.
        timeout = settings.events_keepalive_s + settings.redis_timeout_s
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=settings.redis_timeout_s)
        self.store = EventLog(client)
        self.slots = threading.BoundedSemaphore(settings.events_max_streams) if settings.events_max_streams else None

    def now_ms(self) -> int | None:
        """Redis' clock (Unix ms), which stamps every event id; None when Redis does not answer (the stream's own reads say so)."""
        try:
            seconds, micros = self.store.redis.time()
        except redis.RedisError:
            return None
        return int(seconds) * 1000 + int(micros) // 1000

    def respond(self, followed: Followed, after: str | None) -> Response:
        """The streaming answer for ``followed``; 503 when this process serves as many streams as it may, or Redis is down."""
        if self.slots is None or not self.slots.acquire(blocking=False):
            raise ServiceUnavailable(
                f"this API process already serves {self.settings.events_max_streams} event streams; poll GET instead, or retry later", retry_after_s=5,
            )
        try:
            self.store.redis.ping()
        except redis.RedisError as exc:
            self.slots.release()
            raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
        body = follow(self.store, followed, after, keepalive_s=self.settings.events_keepalive_s, max_s=self.settings.events_max_s)
        response = Response(stream_with_context(body), mimetype=EVENT_STREAM)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        response.call_on_close(self.slots.release)  # the server closes every answer once, however the stream ended
        return response


_built = threading.Lock()


def streams() -> EventStreams:
    """The current app's event streams, built on first use."""
    found = current_app.extensions.get("convtune.events")
    if found is None:
        with _built:
            found = current_app.extensions.get("convtune.events")
            if found is None:
                found = current_app.extensions["convtune.events"] = EventStreams(services().settings)
    return found


def _after(query: EventsQuery, header: EventsHeader) -> str | None:
    return header.last_event_id or query.last_event_id


# --- the routes -----------------------------------------------------------------------------------


@bp.get("/trials/<trial_id>/events", tags=[Tag(name="trials")], responses={200: STREAM_RESPONSE, **problems(404, 503)})
def trial_events(path: TrialPath, query: EventsQuery, header: EventsHeader):
    """Follow a trial as server-sent events: a snapshot, then running, each epoch's metrics, ended.

    Resumable: send `Last-Event-ID` (or `?last_event_id=`) to get only the events after it. The
    stream ends after `ended`; a quiet stream sends `: keep-alive` comments. Instead of polling GET
    (three MLflow reads a poll), a stream reads MLflow once, then once per quiet spell.
    """
    def read() -> tuple[dict[str, Any], bool]:
        record = services().runs.get(path.trial_id)
        return trial_public(record, with_history=False).model_dump(mode="json"), record.terminal

    return _respond(path.trial_id, read, query, header)


@bp.get("/studies/<study_id>/events", tags=[Tag(name="studies")], responses={200: STREAM_RESPONSE, **problems(404, 503)})
def study_events(path: StudyPath, query: EventsQuery, header: EventsHeader):
    """Follow a study as server-sent events: a snapshot, then each trial started and ended, ended.

    Resumable with `Last-Event-ID` (or `?last_event_id=`). Each trial's epochs are on that trial's
    own stream (`/trials/{id}/events`).
    """
    def read() -> tuple[dict[str, Any], bool]:
        record = study_store().get(path.study_id)
        return study_public(record).model_dump(mode="json"), record.terminal

    return _respond(path.study_id, read, query, header)


@bp.get("/lr-finder/<test_id>/events", tags=[Tag(name="lr-finder")], responses={200: STREAM_RESPONSE, **problems(404, 503)})
def range_test_events(path: LrFinderPath, query: EventsQuery, header: EventsHeader):
    """Follow a range test as server-sent events: a snapshot, then running, ended.

    Resumable with `Last-Event-ID` (or `?last_event_id=`); GET with `curve=true` has the curve.
    """
    def read() -> tuple[dict[str, Any], bool]:
        record = services().runs.get_run(path.test_id, KIND.LR_FINDER, RANGE_TEST)
        return range_test_public(record, with_curve=False).model_dump(mode="json"), record.terminal

    return _respond(path.test_id, read, query, header)


def _respond(run_id: str, read: Callable[[], tuple[dict[str, Any], bool]], query: EventsQuery, header: EventsHeader) -> Response:
    read_at_ms = streams().now_ms()  # on the clock that stamps the events' ids
    snapshot, terminal = read()  # NotFound (another team's too) and ServiceUnavailable answer here, before any event
    return streams().respond(Followed(run_id, snapshot, terminal, read, read_at_ms), _after(query, header))
