"""The workers' Celery app: JSON only, late acks, prefetch of one, queues ``gpu`` and ``cpu``.

Start workers with ``convtune worker`` (one process per visible GPU), or by hand:
``celery -A workers.celery_app worker -P prefork -c 1 -Q cpu -n cpu0@%h``. The tasks live in
:mod:`workers.tasks` (named in ``include``, loaded by the worker, not imported here); the
reconciler (:mod:`workers.reconciler`, also in ``include``) sweeps from the main process, which
also beats (:mod:`workers.fleet`): the queues it serves and the messages it holds.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import setup_logging, task_postrun, task_prerun, worker_process_init

from models.logs import configure_logging
from models.messages import celery_config
from models.store.share import Share, team_of_queue, weights_of
from workers.runtime import runtime, settle_heap
from workers.settings import WorkerSettings

__all__ = ["app", "settings", "share"]

# Read once, when the worker starts: the tasks' retry policy (workers.failures) is fixed then.
settings = _settings = WorkerSettings()
# workers.reconciler starts its sweep, and workers.fleet its heartbeat, on worker_ready in this (main)
# process; named here, not imported, since the reconciler sends through this app and ends studies
# through the tasks' modules.
app = Celery("convtune-workers", include=["workers.tasks", "workers.reconciler", "workers.fleet"])
app.conf.update(celery_config(_settings.redis_url, _settings.visibility_timeout_s, socket_timeout_s=_settings.broker_timeout_s))
# A pool process warms up before it says it is up (torch's first optimizer step, _warm_up below), which
# takes seconds on a loaded host (docs/performance.md). Celery's default wait of 4 s then killed every
# new pool process before it was up, one after another, and the worker never trained again.
app.conf.worker_proc_alive_timeout = 120


@setup_logging.connect
def _logging(**_: object) -> None:
    """Log JSON lines (CONVTUNE_LOG_FORMAT=json, the default) carrying the trial and study ids."""
    configure_logging("worker", _settings.log_format, _settings.log_level)


@worker_process_init.connect
def _warm_up(**_: object) -> None:
    """Pay the one-off costs (torch, the first optimizer, MLflow) once per process, not per trial."""
    runtime().warm_up()


@lru_cache(maxsize=1)
def share() -> Share:
    """This process's side of the fair share between teams (:mod:`models.store.share`): sends and dispatches."""
    return Share(runtime().redis, app, enabled=_settings.fair_share, weights=weights_of(_settings.teams))


_started: dict[str, float] = {}  # task id -> when its task started in this process (monotonic)


@task_prerun.connect
def _start(task_id: str, **_: object) -> None:
    _started[task_id] = time.monotonic()


@task_postrun.connect
def _ended(task_id: str, task: Any, **_: object) -> None:
    """A task ended: charge its team the seconds it held its slot, and feed the slot before the ack frees it.

    Then, once per process, after its first task: keep the long-lived heap out of Python's full collections.
    """
    started = _started.pop(task_id, None)
    routed = team_of_queue((task.request.delivery_info or {}).get("routing_key") or "")
    if routed is not None:
        if started is not None:
            share().settle(task_id, time.monotonic() - started)
        share().dispatch(routed[0], ending=task_id)
    settle_heap()
