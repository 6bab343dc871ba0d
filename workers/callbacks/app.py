"""The callback worker's Celery app: consumes only the ``callbacks`` queue, imports no torch.

Start it with ``convtune worker`` (which runs one next to the training workers), or by hand:
``celery -A workers.callbacks.app worker -P threads -c 4 -Q callbacks -n callbacks@%h``. Threads
suit it: a delivery mostly waits on the network, and a slow receiver holds one thread, never a GPU.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import setup_logging

from models.logs import configure_logging
from models.messages import CALLBACK_QUEUE, celery_config
from workers.settings import WorkerSettings

__all__ = ["app", "settings"]

log = logging.getLogger(__name__)

# Read once, when the worker starts: the delivery task's retry policy (workers.callbacks.delivery) is fixed then.
settings = WorkerSettings()
app = Celery("convtune-callbacks", include=["workers.callbacks.delivery", "workers.fleet"])
app.conf.update(celery_config(settings.redis_url, settings.visibility_timeout_s, socket_timeout_s=settings.broker_timeout_s))
app.conf.task_default_queue = CALLBACK_QUEUE


@setup_logging.connect
def _logging(**_: object) -> None:
    configure_logging("callbacks", settings.log_format, settings.log_level)
    if not settings.master_key:
        log.warning("CONVTUNE_SECRET_KEY is not set: callbacks cannot be signed, so none is sent (each is logged and dropped)")
