"""What a sweep sees in Redis and what it decides: pure functions, no clients (unit-tested with plain values)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from models.compat import CompatError, kombu_redis
from models.store.runs import TAG

__all__ = ["Held", "Messages", "Seen", "Verdict", "judge_run", "judge_slot", "parse_messages", "run_status", "unheld"]


class Held(NamedTuple):
    """One message held unacked: its delivery tag, task id, task name and how long it has been held."""

    tag: bytes
    task_id: str
    task: str
    held_s: float


@dataclass(frozen=True)
class Messages:
    """The task ids of the messages in Redis: waiting in a queue, and held unacked by a worker (id -> seconds held)."""

    waiting: frozenset[str]
    unacked: dict[str, float]
    held: tuple[Held, ...] = ()  # each copy held, with its delivery tag

    def held_for(self, task_id: str) -> float | None:
        """How long a worker has held ``task_id``'s message unacked (the shortest, when several); None: no worker does."""
        return self.unacked.get(task_id)


def parse_messages(queued: Iterable[bytes], unacked: dict[bytes, bytes], delivered_at: dict[bytes, float], now: float) -> Messages:
    """Messages from kombu's raw values: the queue lists' items, the ``unacked`` hash and its index of delivery times."""
    waiting = {_task_id(item) for item in queued} - {""}
    held: dict[str, float] = {}
    copies = []
    for tag, raw in unacked.items():
        try:
            message = kombu_redis.unacked_value(raw)[0]
        except CompatError:  # not a message kombu wrote
            continue
        task_id = _task_id(message)
        if task_id:
            age = max(0.0, now - delivered_at.get(tag, now))
            held[task_id] = min(age, held.get(task_id, age))
            copies.append(Held(tag, task_id, _header(message, "task"), age))
    return Messages(frozenset(waiting), held, tuple(copies))


def unheld(messages: Messages, live_held: set[str], min_held_s: float) -> list[Held]:
    """The messages held unacked for ``min_held_s`` or more whose task no live worker holds: their worker died.

    A live worker lists every task it holds (running, prefetched, waiting for an ETA) in its beat
    (:mod:`models.store.fleet`); ``min_held_s`` is longer than a beat lives, so the beat of any worker
    that took a message was written after it did. A task a live worker holds keeps all its copies.
    """
    return [h for h in messages.held if h.held_s >= min_held_s and h.task_id not in live_held]


def _task_id(message: bytes | str | dict) -> str:
    return _header(message, "id")


def _header(message: bytes | str | dict, name: str) -> str:
    try:
        payload = message if isinstance(message, dict) else json.loads(message)
        return str(payload["headers"][name])
    except (ValueError, TypeError, KeyError):
        return ""  # not a Celery message


def run_status(run: Any) -> str:
    """An MLflow run's status, except that one no worker ever started counts as SCHEDULED.

    MLflow creates a run RUNNING and convtune makes it SCHEDULED a call later (models.store.runs.create_run):
    a run caught in between, or left there by an API that died, has not lost a worker.
    """
    status = run.info.status
    return "SCHEDULED" if status == "RUNNING" and TAG.STARTED_AT not in run.data.tags else status


class Seen(NamedTuple):
    """What a sweep saw of one piece of work in Redis."""

    lease: bool  # its lease is held: a worker runs it now (a study slot: its trial's, or the lease of the step starting it)
    cancel: bool = False  # its cancel flag is raised
    waiting: bool = False  # its message waits in a queue
    held_s: float | None = None  # a worker has held its message unacked for this long (None: none does)
    resent: bool = False  # the reconciler re-sent its message a moment ago (less than the grace)


class Verdict(NamedTuple):
    """What to do (``action``: resent, cancelled, ended...), why, and whether only once it was seen so for the grace."""

    action: str
    why: str
    after_grace: bool = True


def judge_run(status: str, seen: Seen, stale_s: float) -> Verdict | None:
    """What to do with a trial or a range test of no study (MLflow ``status``); None while something carries it.

    A running run renews its lease every TTL/3: with no lease its worker is gone, even when its
    message still sits unacked (a worker killed whole), so it is re-sent at once, unless the copy
    the reconciler re-sent a moment ago waits in a queue or was just taken by a worker.
    A queued run's message held unacked longer than ``stale_s`` (longer than any retry waits) was
    left there by a worker that died or could not give it back: it is re-sent too (a second copy
    is harmless, the lease lets one delivery run).
    """
    if seen.lease:
        return None
    if status == "RUNNING":
        if seen.cancel:
            return Verdict("cancelled", "running with no live lease and its cancel flag raised", after_grace=False)
        if seen.waiting or (seen.resent and seen.held_s is not None):
            return None
        held = f"; its message held unacked {seen.held_s:.0f}s by a worker that died or waits to retry" if seen.held_s is not None else ""
        return Verdict("resent", f"running with no live lease: no worker trains it{held}", after_grace=False)
    if seen.waiting or (seen.held_s is not None and seen.held_s < stale_s):
        return None  # a worker holds it: starting it, or waiting to retry
    if seen.cancel:
        return Verdict("cancelled", "queued with its cancel flag raised and no live message")
    if seen.held_s is not None:
        return Verdict("resent", f"queued, its message held unacked for {seen.held_s:.0f}s, longer than any retry waits (its worker died)")
    return Verdict("resent", "queued with no message in any queue (lost: Redis restarted empty, or it was never sent)")


def judge_slot(trial_status: str | None, seen: Seen, lr_auto: str | None, grace_s: float, stale_s: float) -> Verdict | None:
    """What to do with a study's slot in flight; None while something carries it.

    ``trial_status`` is the MLflow status of the trial the slot recorded (None: none yet); ``seen``
    is the slot's step message with that trial's lease; ``lr_auto`` is ``held`` while the study's
    lr_auto range test holds its lease, ``lost`` when that range test is open with no lease, else None.
    A step held unacked longer than ``stale_s`` (its worker died, or its retry waits behind another
    trial a worker runs) is re-sent: the trial's lease lets one delivery resume a slot's trial, and
    the slot's own lease (``seen.lease`` while no trial is recorded) one delivery start it.
    """
    if seen.lease or seen.waiting:
        return None
    if trial_status == "RUNNING":
        if seen.resent and seen.held_s is not None:
            return None
        return Verdict("resent", "its trial runs with no live lease: its worker was lost; the step resumes it", after_grace=False)
    if trial_status is not None:
        if seen.held_s is not None and seen.held_s < stale_s:
            return None
        where = "no step message" if seen.held_s is None else f"its step message held unacked for {seen.held_s:.0f}s"
        return Verdict("resent", f"{where}, and its trial is {trial_status.lower()} with no lease")
    if lr_auto == "held":
        return None  # its step waits for the study's range test
    # A step that ran the lost range test has held its message since before the lease lapsed; a sibling
    # waiting on that lease re-sends itself every few seconds: its message is fresh.
    if lr_auto == "lost" and seen.held_s is not None and seen.held_s >= grace_s:
        return Verdict("resent", "its step ran the lr_auto range test, whose worker was lost", after_grace=False)
    if seen.held_s is not None and seen.held_s < stale_s:
        return None  # its step runs, or waits to retry
    if seen.held_s is not None:
        return Verdict("resent", f"no trial started and no step starting it, its step message held unacked for {seen.held_s:.0f}s, longer than any retry waits")
    return Verdict("resent", "no step message in any queue and no trial started (lost: Redis restarted empty, or it was never sent)")
