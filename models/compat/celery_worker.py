"""Celery's worker: the requests a worker process holds, and the queues it consumes.

A worker's heartbeat (:mod:`workers.fleet`) names the messages it holds, so that the reconciler gives
back to their queue only those no live worker holds. Celery has no API for either read:

- the requests are in three module-level sets of :mod:`celery.worker.state`: ``reserved_requests``
  (taken from the broker, waiting for a pool process), ``scheduled_requests`` (waiting for an ETA or
  countdown: *not* in ``reserved_requests`` until it elapses) and ``active_requests`` (running); the
  worker's main thread changes them while the heart's thread copies them;
- the queues are ``app.amqp.queues.consume_from``: what ``-Q`` selected, kept up to date by
  ``add_consumer``/``cancel_consumer``, and there while the broker connection is down;
- the tasks it runs at once are its ``controller.concurrency`` (``-c``), which the fair share counts as its slots.

Checked on celery 5.7.0 (``tests/compat/test_celery_worker.py``).
"""

from __future__ import annotations

import time
from typing import Any

from models.compat._base import CompatError, require

__all__ = ["consumed_queues", "held_task_ids", "pool_slots"]

_LIBRARY = "celery"
_MODULE = "models/compat/celery_worker.py"
_REQUEST_SETS = ("reserved_requests", "scheduled_requests", "active_requests")


def held_task_ids() -> set[str] | None:
    """The task ids of every request this worker process holds; None when they could not be read this time.

    A copy that races with the main thread's change ("Set changed size during iteration") is tried
    again, five times at most.
    """
    from celery.worker import state

    kinds = [require(state, name, _LIBRARY, f"celery.worker.state keeps a worker's requests in {name}", _MODULE) for name in _REQUEST_SETS]
    for _ in range(5):
        try:
            return {request.id for requests in kinds for request in tuple(requests)}
        except RuntimeError:
            time.sleep(0.01)
    return None


def consumed_queues(consumer: Any) -> list[str]:
    """The names of the queues ``consumer`` (a worker's, the sender of ``worker_ready``) takes messages from."""
    queues = consumer.app.amqp.queues
    consume_from = require(queues, "consume_from", _LIBRARY, "app.amqp.queues.consume_from holds the queues -Q selected", _MODULE)
    if consume_from is None:  # no -Q: every declared queue (Queues.consume_from's meaning of None)
        return sorted(queues)
    if not hasattr(consume_from, "__iter__"):
        raise CompatError(_LIBRARY, "app.amqp.queues.consume_from maps queue names to queues", _MODULE, type(consume_from).__name__)
    return sorted(consume_from)


def pool_slots(consumer: Any) -> int:
    """How many tasks ``consumer``'s worker runs at once (its pool's concurrency, ``-c``)."""
    controller = require(consumer, "controller", _LIBRARY, "a worker's consumer knows its WorkController as .controller", _MODULE)
    concurrency = require(controller, "concurrency", _LIBRARY, "a WorkController's .concurrency is its pool's size (-c)", _MODULE)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise CompatError(_LIBRARY, "a WorkController's .concurrency is its pool's size (-c)", _MODULE, repr(concurrency))
    return concurrency
