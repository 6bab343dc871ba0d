"""Which workers are alive, which queues they serve and which messages they hold: a heartbeat in Redis.

Each worker's main process writes one key every :data:`BEAT_S` seconds (:func:`beat`), living
:data:`BEAT_TTL_S`: its queues and the task ids of every message it holds (reserved, prefetched,
waiting for an ETA, or running). A worker killed whole, or paused, stops beating and its key lapses.
Two things read it:

- the API refuses work for a queue no worker has served for a while (:func:`served_queues`): it
  would wait for ever;
- the reconciler gives back to its queue a message held unacked that no live worker holds
  (:func:`held_task_ids`): its worker died, and Redis would return it only after the visibility
  timeout (hours).

A queue's "served" mark (:func:`queue_served_key`) outlives the heartbeats by ``served_ttl_s``, so a
rolling restart of every worker does not turn submits away. Each beat also stamps its queues in one
hash that never expires (:func:`last_served`): how long a queue has been without a worker, which the
reconciler reads to end the work queued there (:mod:`workers.reconciler.unserved`), and whether this
Redis has any record of a worker at all (:func:`has_record`: a new deployment, or Redis restarted
empty, whose workers' first beats are seconds away). Redis losing its data loses these keys too:
they come back at the next beat, and both readers wait longer than a beat before acting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import NamedTuple

import redis

__all__ = [
    "BEAT_S", "BEAT_TTL_S", "WorkerBeat", "beat", "has_record", "held_task_ids", "last_served", "leave", "live_workers", "queue_served_key",
    "served_queues",
]

BEAT_S = 5.0  # how often a worker beats
BEAT_TTL_S = 20  # how long a beat lives: four beats missed and the worker counts as gone
_PREFIX = "convtune:fleet:worker:"
_SERVED_PREFIX = "convtune:fleet:queue:"
_LAST_SERVED_KEY = "convtune:fleet:last_served"  # hash: queue -> Unix time of its last beat (or of the first sweep that saw it unserved)


class WorkerBeat(NamedTuple):
    """One live worker's last beat: its queues, the task ids it holds, when (Unix seconds), its slots (tasks it runs at once)."""

    name: str
    queues: frozenset[str]
    held: frozenset[str]
    at: float
    slots: int = 1


def queue_served_key(queue: str) -> str:
    """Redis key that lives as long as some worker served ``queue`` recently."""
    return f"{_SERVED_PREFIX}{queue}"


def beat(client: redis.Redis, worker: str, queues: Iterable[str], held: Iterable[str], served_ttl_s: int, slots: int = 1) -> None:
    """Say that ``worker`` is alive, serves ``queues``, runs ``slots`` tasks at once and holds the messages ``held`` (task ids)."""
    queues = sorted(set(queues))
    now = time.time()
    document = json.dumps({"queues": queues, "held": sorted(set(held)), "at": now, "slots": slots})
    pipe = client.pipeline(transaction=False)
    pipe.set(f"{_PREFIX}{worker}", document, ex=BEAT_TTL_S)
    for queue in queues:
        pipe.set(queue_served_key(queue), worker, ex=max(BEAT_TTL_S, served_ttl_s))
    if queues:
        pipe.hset(_LAST_SERVED_KEY, mapping=dict.fromkeys(queues, now))
    pipe.execute()


def leave(client: redis.Redis, worker: str) -> None:
    """Remove ``worker``'s beat (a clean stop: it holds nothing any more); its queues' served marks stay."""
    client.delete(f"{_PREFIX}{worker}")


def live_workers(client: redis.Redis) -> list[WorkerBeat]:
    """Every worker whose beat has not lapsed."""
    keys = sorted(client.scan_iter(match=f"{_PREFIX}*", count=500))
    if not keys:
        return []
    found = []
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if raw is None:
            continue  # lapsed between the scan and the read
        try:
            doc = json.loads(raw)
            found.append(WorkerBeat(
                key.decode()[len(_PREFIX):], frozenset(doc["queues"]), frozenset(doc["held"]), float(doc["at"]), max(1, int(doc.get("slots", 1))),
            ))
        except (ValueError, KeyError, TypeError):
            continue  # not ours
    return found


def held_task_ids(client: redis.Redis) -> set[str]:
    """The task ids of every message a live worker holds."""
    return {task_id for worker in live_workers(client) for task_id in worker.held}


def served_queues(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Which of ``queues`` a worker served within its served TTL (one request)."""
    queues = list(queues)
    if not queues:
        return set()
    found = client.mget([queue_served_key(q) for q in queues])
    return {q for q, v in zip(queues, found, strict=True) if v is not None}


def has_record(client: redis.Redis, queues: Iterable[str]) -> bool:
    """Whether this Redis knows of a worker of any of ``queues``: False on a new deployment, or after Redis lost its data.

    Only those queues: the light callback worker starts (and beats) seconds before the training
    workers, whose queues the API asks about.
    """
    queues = sorted(set(queues))
    return bool(queues) and any(v is not None for v in client.hmget(_LAST_SERVED_KEY, queues))


def last_served(client: redis.Redis, queues: Iterable[str], now: float) -> dict[str, float]:
    """When each of ``queues`` was last served (its workers' last beat, Unix seconds).

    A queue with no record (never served here, or Redis lost the hash) starts its clock at ``now``:
    it counts as unserved from the first time someone asked.
    """
    queues = sorted(set(queues))
    if not queues:
        return {}
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.hsetnx(_LAST_SERVED_KEY, queue, now)
    pipe.hmget(_LAST_SERVED_KEY, queues)
    *_, found = pipe.execute()
    return {q: float(v) if v is not None else now for q, v in zip(queues, found, strict=True)}
