"""The reconciler: finds accepted work that nothing carries any more, and re-sends or ends it.

ARCHITECTURE.md, decision 7: every 202 ends with an outcome and a reason. A message can be lost (Redis
restarted empty, an API process that died between creating the run and sending its message,
kombu's window between taking a message and recording it as unacked) and a worker can die whole
(its message then sits in Redis' ``unacked`` hash until the visibility timeout, hours). Every
worker's main process runs a :class:`Reconciler` in a daemon thread, started on ``worker_ready``
and stopped on ``worker_shutdown`` (this package is in the Celery app's ``include``); a Redis lock
with a token lets one of them sweep at a time, across hosts, about once per ``reconcile_interval_s``.
It builds its own MLflow and Redis clients: it never touches the device.

A sweep (:mod:`workers.reconciler.sweep`) reads the task ids of the messages waiting in the queues
and held unacked by a worker (and for how long); once some worker beats (:mod:`models.store.fleet`),
it first gives back to its queue every message held unacked for the grace (and longer than a beat
lives) that no live worker lists, whatever its kind (trial, study step, range test, callback):
its worker died, and Redis would return it only after the visibility timeout. With no beat at all
(workers that do not beat, or a Redis that lost everything) it falls back to the rules below alone.
Then it reads the open runs of the experiment (MLflow SCHEDULED or RUNNING), their leases and
cancel flags, and decides (:mod:`workers.reconciler.judge`):

    work                               seen                                           action
    trial or range test, queued        no message (or one held unacked longer than    re-send its message
                                       any retry waits), no lease, for the grace
    trial or range test, running       no live lease, no re-sent copy on its way      re-send: it resumes (*)
    either, cancel flag raised         no live lease (queued: for the grace)          end it cancelled
    study, its counters gone           for the grace                                  rebuild them from Optuna, top up
    any message held unacked           no live worker lists it, held for the grace    give it back to its queue
                                       and a beat's life (some worker beats)
    study slot in flight               no step message, no lease on its trial nor     re-send the step
                                       its slot, for the grace (at once if its trial
                                       runs); or its step held unacked longer than
                                       any retry waits
    study slot whose trial ended       Optuna has the trial, the slot is unreleased   release it, send the next
    study, nothing in flight           for the grace                                  top it up, or finish it
    study trial or range test that     no lease, for the grace (a range test that     end it worker_lost
    no slot in flight carries          runs: at once)                                 (cancelled if asked)

(*) A running trial renews its lease every TTL/3, so no lease means its worker is gone even when
its message still sits in ``unacked``: a worker killed whole is resumed within about the lease TTL
plus one sweep; its old message, when Redis gives it back hours later, finds the run ended and is
skipped. Attempts stay capped by ``max_attempts`` (then ``worker_lost``).

"For the grace" means the same finding on every sweep for ``reconcile_grace_s``, the first time
each was seen being kept in Redis: a run the API created a moment before sending its message, or
a message on its way from a queue to a worker, is never touched. Every action is one log line,
``reconciler: <action> <kind> <id>: <why>`` (with the trial or study id), and one count in a Redis
hash, on the API's ``/metrics`` as ``convtune_reconciler_actions_total{kind,action}``.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from workers.reconciler.sweep import Reconciler
from workers.settings import WorkerSettings

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)
_stop = threading.Event()
_thread: threading.Thread | None = None


@worker_ready.connect
def _start(**_: object) -> None:
    """Start sweeping in this worker's main process (worker_ready is never sent in a pool process)."""
    global _thread
    settings = WorkerSettings()
    if settings.reconcile_interval_s <= 0:
        log.info("reconciler off (CONVTUNE_RECONCILE_INTERVAL_S=0)")
        return
    reconciler = Reconciler.from_settings(settings)
    _stop.clear()
    _thread = threading.Thread(target=reconciler.run, args=(_stop,), name="convtune-reconciler", daemon=True)
    _thread.start()
    log.info(
        "reconciler started: a sweep about every %.0fs across the workers (experiment %r, grace %.0fs)",
        settings.reconcile_interval_s, settings.experiment, settings.reconcile_grace_s,
    )


@worker_shutdown.connect
def _shutdown(**_: object) -> None:
    """Stop sweeping; a sweep under way is left to its daemon thread."""
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
