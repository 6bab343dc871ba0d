"""Contract: models.compat.celery_worker's reads of a worker's requests and queues hold on the installed Celery."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.worker import state

from models.compat import celery_worker
from models.compat._base import CompatError
from models.compat.celery_worker import consumed_queues, held_task_ids


class _Request:
    """What celery.worker.state's bookkeeping reads of a request."""

    def __init__(self, name: str = "convtune.run_trial"):
        self.id = uuid.uuid4().hex
        self.name = name


def test_held_task_ids_reads_the_reserved_the_eta_waiting_and_the_running_requests():
    # Celery 5.7: a request waiting for its ETA (a retry's countdown) is in scheduled_requests, not reserved_requests.
    reserved, waiting, running = _Request(), _Request(), _Request()
    state.task_reserved(reserved)
    state.task_scheduled(waiting)
    state.task_accepted(running)
    try:
        assert waiting not in state.reserved_requests, "celery keeps ETA requests in reserved_requests again: simplify held_task_ids"
        assert {reserved.id, waiting.id, running.id} <= held_task_ids()
    finally:
        for request in (reserved, waiting, running):
            state.task_ready(request)
    assert not {reserved.id, waiting.id, running.id} & held_task_ids()


def test_consumed_queues_follows_q_and_the_queues_added_or_cancelled_at_run_time():
    app = Celery("fleet-test", set_as_current=False)
    app.conf.task_default_queue = "gpu"
    consumer = SimpleNamespace(app=app, hostname="cpu0@host")
    app.amqp.queues.select(["cpu"])  # what `-Q cpu` does (celery.worker.WorkController.setup_queues)
    assert consumed_queues(consumer) == ["cpu"]
    app.amqp.queues.select_add("extra")  # app.control.add_consumer (Consumer.add_task_queue)
    assert consumed_queues(consumer) == ["cpu", "extra"]
    app.amqp.queues.deselect("extra")  # cancel_consumer (Consumer.cancel_task_queue)
    assert consumed_queues(consumer) == ["cpu"]


def test_a_celery_without_one_of_the_request_sets_fails_with_the_assumption(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(state, "scheduled_requests")
    with pytest.raises(CompatError, match=r"celery .* no longer holds what models/compat/celery_worker.py assumes: .*scheduled_requests"):
        celery_worker.held_task_ids()


def test_queues_without_consume_from_fail_with_the_assumption():
    consumer = SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace())), hostname="w@h")
    with pytest.raises(CompatError, match="consume_from"):
        consumed_queues(consumer)
