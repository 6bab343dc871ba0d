"""After a trial ends on this worker: count its outcome for /metrics and queue its callback.

Called by the task once :func:`workers.trial.execution.execute_trial` has ended the run (never for a
skipped duplicate). Queuing is one Redis push: the delivery itself, with its retries, happens on
the callback worker, so a slow or dead receiver never holds this GPU. Never raises: the trial has
ended whatever happens to its announcement.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from mlflow.exceptions import MlflowException

from models.callbacks import study_ended_event, trial_ended_event
from models.messages import CALLBACK_QUEUE, TASK_DELIVER_CALLBACK
from models.store.keys import OUTCOME_COUNTS_KEY
from models.store.runs import TAG, client_status
from workers.trial.execution import WorkerRuntime

__all__ = ["announce_end", "announce_study_end", "count_outcome"]

log = logging.getLogger(__name__)


def announce_end(trial_id: str, payload: dict, rt: WorkerRuntime) -> None:
    """Count the trial's outcome and send its ``trial.ended`` event to the callbacks queue."""
    try:
        run = rt.mlflow.get_run(trial_id)
    except (MlflowException, OSError) as exc:
        log.error("trial %s ended but could not be read back to announce it: %s", trial_id, exc)
        return
    tags = run.data.tags
    outcome = tags.get(TAG.OUTCOME, "error")
    count_outcome(rt, outcome)
    url = payload.get("callback_url")
    if not url:
        return
    event = trial_ended_event(
        trial_id, name=tags.get(TAG.RUN_NAME), status=client_status(run.info.status, outcome), outcome=outcome,
        reason=tags.get(TAG.REASON, ""), metrics=dict(run.data.metrics), study_id=tags.get(TAG.STUDY_ID),
    )
    _queue_callback(url, event, f"trial {trial_id}")


def count_outcome(rt: WorkerRuntime, outcome: str) -> None:
    """Count one more trial ended with ``outcome`` (``convtune_trials_ended_total`` on /metrics)."""
    try:
        rt.redis.hincrby(OUTCOME_COUNTS_KEY, outcome, 1)
    except redis.RedisError as exc:
        log.warning("could not count a trial's outcome (%s): %s", outcome, exc)


def announce_study_end(
    study_id: str, callback_url: str | None, *, name: str | None, mlflow_status: str, outcome: str, reason: str,
    best: dict[str, Any] | None, counts: dict[str, int],
) -> None:
    """Send a study's ``study.ended`` event to the callbacks queue, when it has a callback_url."""
    if not callback_url:
        return
    state = {"FINISHED": "succeeded", "KILLED": "cancelled"}.get(mlflow_status, "failed")
    event = study_ended_event(study_id, name=name, state=state, outcome=outcome, reason=reason, best=best, counts=counts)
    _queue_callback(callback_url, event, f"study {study_id}")


def _queue_callback(url: str, event: dict[str, Any], what: str) -> None:
    from workers.celery_app import app

    try:
        app.send_task(TASK_DELIVER_CALLBACK, kwargs={"url": url, "event": event}, queue=CALLBACK_QUEUE, retry=True, retry_policy={"max_retries": 3})
        log.info("%s: callback queued for %s", what, url)
    except Exception as exc:  # the broker is down: it has ended all the same
        log.error("%s: its callback could not be queued: %s", what, exc)
