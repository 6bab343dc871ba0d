"""Work waiting on a queue that lost its last worker: ended ``error`` once the queue has had none for ``unserved_queue_s``.

The API refuses a submit to a queue no worker serves (``service.api.admission.served_queue``). What
it accepted before the queue lost its workers, or in a new deployment's first seconds, would wait
for ever: no worker would take its message, and the rest of the sweep keeps re-sending it. Every
worker beats the queues it serves (:mod:`workers.fleet`) and the last beat of each queue is kept
(:func:`models.store.fleet.last_served`); a queue no beat has named for ``unserved_queue_s`` ends,
at the next sweep, the work on it that nothing runs:

    work on the queue                                  ended
    a trial or range test of no study, queued or       failed, outcome error, its reason naming the
    running with no live lease                         queue and how long it has had no worker
    a study none of whose trials (nor its lr_auto      the same, its slots stopped; its open trials
    range test) holds a live lease                     end with it

Work whose cancel flag is raised is left to the rest of the sweep, which ends it cancelled. A queue
with no recorded beat at all (never served, or Redis lost the record) starts its clock the first
time a sweep asks, so Redis restarting empty never ends work early. ``unserved_queue_s`` 0 turns it
off. The bound, for work on a queue whose last worker is gone: its last beat, plus
``unserved_queue_s``, plus at most one sweep.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

import redis

from models.store import fleet
from models.store.budget import StudyBudget
from models.store.keys import cancel_key, lease_key
from models.store.runs import KIND, TAG
from workers.reconciler.judge import run_status
from workers.settings import WorkerSettings

__all__ = ["Sweeper", "Unserved", "end_unserved", "stranded_on", "unserved_queues"]

DEFAULT_QUEUE = "gpu"  # a run with no queue tag went to the workers' default queue (models.messages.celery_config)


class Sweeper(Protocol):
    """What this needs of a sweep (:class:`workers.reconciler.sweep._Sweep`): its clients, its clock, and how it ends a run."""

    settings: WorkerSettings
    redis: redis.Redis
    now: float

    def still(self, run_id: str, status: str | None, lease: str | None = None) -> bool: ...

    def end(self, run: Any, status: str, outcome: str, reason: str, why: str, *, action: str) -> None: ...


class Unserved(NamedTuple):
    """A run on a queue with no worker, and the study trials that end with it (none for a trial of no study)."""

    run: Any
    queue: str
    children: list[Any]


def unserved_queues(client: redis.Redis, queues: Iterable[str], now: float, limit_s: float) -> dict[str, float]:
    """Those of ``queues`` that no worker's beat named for ``limit_s`` or more: queue -> seconds since the last one."""
    return {q: now - at for q, at in fleet.last_served(client, queues, now).items() if now - at >= limit_s}


def stranded_on(open_runs: list[Any], unserved: dict[str, float]) -> list[Unserved]:
    """The trials, range tests and studies of ``open_runs`` waiting on an ``unserved`` queue (studies with their open children)."""
    children: dict[str, list[Any]] = defaultdict(list)
    for run in open_runs:
        study_id = run.data.tags.get(TAG.STUDY_ID)
        if study_id and run.data.tags.get(TAG.KIND) != KIND.STUDY:
            children[study_id].append(run)
    found = []
    for run in open_runs:
        tags = run.data.tags
        queue = tags.get(TAG.QUEUE, DEFAULT_QUEUE)
        if queue not in unserved:
            continue
        if tags.get(TAG.KIND) == KIND.STUDY:
            found.append(Unserved(run, queue, children.get(run.info.run_id, [])))
        elif tags.get(TAG.KIND) in (KIND.TRIAL, KIND.LR_FINDER) and not tags.get(TAG.STUDY_ID):
            found.append(Unserved(run, queue, []))
    return found


def end_unserved(sweep: Sweeper, open_runs: list[Any]) -> set[str]:
    """End the work of ``open_runs`` waiting on a queue no worker has served for ``unserved_queue_s``; the ids of the runs ended.

    Call it once per sweep, after reading the open runs: the rest of the sweep must skip the runs it ended.
    """
    limit_s = sweep.settings.unserved_queue_s
    if limit_s <= 0 or not open_runs:
        return set()
    queues = {run.data.tags.get(TAG.QUEUE, DEFAULT_QUEUE) for run in open_runs}
    unserved = unserved_queues(sweep.redis, queues, sweep.now, limit_s)
    ended: set[str] = set()
    for item in stranded_on(open_runs, unserved) if unserved else []:
        run = item.run
        why = f"queue {item.queue!r} has had no worker for {_span(unserved[item.queue])} (CONVTUNE_UNSERVED_QUEUE_S is {limit_s} s)"
        reason = f"no worker serves its queue {item.queue!r}, so nothing would ever run it"
        if _carried(sweep, run, item.children):
            continue
        if not sweep.still(run.info.run_id, run_status(run), lease_key(run.info.run_id)):
            continue  # a worker took it, or it ended, since the runs were read
        if run.data.tags.get(TAG.KIND) == KIND.STUDY:
            StudyBudget(sweep.redis, run.info.run_id).stop("error")  # a step that still arrives starts nothing
            for child in item.children:
                sweep.end(child, "FAILED", "error", f"its study's {reason}", why, action="ended")
                ended.add(child.info.run_id)
        sweep.end(run, "FAILED", "error", reason, why, action="ended")
        ended.add(run.info.run_id)
    return ended


def _carried(sweep: Sweeper, run: Any, children: list[Any]) -> bool:
    """Whether something still runs it (a live lease: its own, a trial's, its lr_auto test's) or it was asked to stop."""
    run_id = run.info.run_id
    keys = [cancel_key(run_id), lease_key(run_id), lease_key(f"{run_id}-lr-auto"), *(lease_key(child.info.run_id) for child in children)]
    return bool(sweep.redis.exists(*keys))


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes} min" if minutes >= 2 else f"{int(seconds)} s"
