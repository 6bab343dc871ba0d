"""A worker's heartbeat (:mod:`models.store.fleet`): which queues it serves, which messages it holds.

Every worker's main process beats from a daemon thread, started on ``worker_ready`` (never sent in a
pool process) and stopped on ``worker_shutdown`` (this module is in the Celery app's ``include``):
at once, then every :data:`~models.store.fleet.BEAT_S` seconds, it writes its node name (``-n``),
the queues its consumer takes messages from (``-Q``, and any added or cancelled since) and the task
id of every message it holds: waiting for a pool process, waiting for its ETA (a retry's countdown)
or running. The API refuses work for a queue no worker serves; the reconciler ends work queued on a
queue that lost its last worker (:mod:`workers.reconciler.unserved`) and gives back messages held
by a worker that stopped beating.

The same thread feeds the queues the worker serves from the teams' waiting queues once a second
(:meth:`models.store.share.Share.dispatch`): a worker that joins, or one whose task ended while
Redis failed, finds the work that waits for it without anyone sending.

It has its own Redis client with the workers' short timeouts: a Redis that fails is logged at most
once a minute and tried again at the next beat. A worker that stops cleanly removes its beat; one
killed whole stops beating and its beat lapses after :data:`~models.store.fleet.BEAT_TTL_S`.

What it reads of Celery's worker state is internal to Celery: it is read through
:mod:`models.compat.celery_worker` (``tests/compat/test_celery_worker.py`` checks exactly those
assumptions against the installed version).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from models.compat.celery_worker import consumed_queues, held_task_ids, pool_slots
from models.messages import QUEUES
from models.store import fleet
from models.store.share import Share, weights_of
from workers.settings import WorkerSettings

__all__ = ["Heart", "consumed_queues", "held_task_ids"]

log = logging.getLogger("workers.fleet")
COMPLAIN_EVERY_S = 60.0  # a Redis that keeps failing is logged at most this often
DISPATCH_S = 1.0  # how often a worker feeds its queues from the teams' waiting queues
_stop = threading.Event()
_heart: Heart | None = None
_thread: threading.Thread | None = None


class Heart:
    """Beats for one worker: :meth:`beat` once, :meth:`run` until told to stop."""

    def __init__(self, client: redis.Redis, consumer: Any, served_ttl_s: int, share: Share | None = None):
        self.client = client
        self.consumer = consumer
        self.name = str(consumer.hostname)
        self.served_ttl_s = served_ttl_s
        self.share = share
        self.slots = pool_slots(consumer)
        self._complained_at: float | None = None

    def beat(self) -> bool:
        """Write this worker's beat now; whether it was written (a failure is logged, at most once a minute)."""
        held = held_task_ids()
        if held is None:
            return False  # the beat before still lives: three more misses before it lapses
        try:
            fleet.beat(self.client, self.name, consumed_queues(self.consumer), held, self.served_ttl_s, self.slots)
        except redis.RedisError as exc:
            now = time.monotonic()
            if self._complained_at is None or now - self._complained_at >= COMPLAIN_EVERY_S:
                self._complained_at = now
                log.warning("fleet: %s could not beat (%s: %s); trying again every %.0fs", self.name, type(exc).__name__, exc, fleet.BEAT_S)
            return False
        if self._complained_at is not None:
            self._complained_at = None
            log.info("fleet: %s beats again", self.name)
        return True

    def dispatch(self) -> None:
        """Feed the training queues this worker serves from the teams' waiting queues (a failure is logged by the share)."""
        if self.share is not None:
            for queue in consumed_queues(self.consumer):
                if queue in QUEUES:
                    self.share.dispatch(queue)

    def run(self, stop: threading.Event) -> None:
        """Beat at once, then every BEAT_S seconds, and dispatch every DISPATCH_S, until ``stop`` is set; then remove the beat."""
        next_beat = 0.0
        while True:
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + fleet.BEAT_S
                try:
                    self.beat()
                except Exception:
                    log.exception("fleet: %s: beat failed", self.name)
            try:
                self.dispatch()
            except Exception:
                log.exception("fleet: %s: dispatch failed", self.name)
            if stop.wait(DISPATCH_S):
                break
        try:
            fleet.leave(self.client, self.name)
        except redis.RedisError:
            pass  # it lapses by itself


@worker_ready.connect
def _start(sender: Any = None, **_: object) -> None:
    """Start beating in this worker's main process (``sender``: its consumer)."""
    global _heart, _thread
    settings = WorkerSettings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.broker_timeout_s, socket_connect_timeout=settings.broker_timeout_s)
    share = Share(client, sender.app, enabled=settings.fair_share, weights=weights_of(settings.teams))
    _heart = Heart(client, sender, settings.unserved_queue_s, share)
    _stop.clear()
    _thread = threading.Thread(target=_heart.run, args=(_stop,), name="convtune-fleet", daemon=True)
    _thread.start()
    log.info("fleet: %s beats every %.0fs, serving %s", _heart.name, fleet.BEAT_S, ", ".join(consumed_queues(sender)) or "no queue")


@worker_shutdown.connect
def _shutdown(**_: object) -> None:
    """Stop beating, and remove this worker's beat: the messages it held are back in Redis."""
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
