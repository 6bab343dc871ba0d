"""After a trial ends on this worker: count its outcome for /metrics and queue its callback.

Called by the task once :func:`workers.execution.execute_trial` has ended the run (never for a
skipped duplicate). Queuing is one Redis push: the delivery itself, with its retries, happens on
the callback worker, so a slow or dead receiver never holds this GPU. Never raises: the trial has
ended whatever happens to its announcement.
"""

from __future__ import annotations

import logging

import redis
from mlflow.exceptions import MlflowException

from models.callbacks import trial_ended_event
from models.protocol import CALLBACK_QUEUE, OUTCOME_COUNTS_KEY, TAG, TASK_DELIVER_CALLBACK, client_status
from workers.execution import WorkerRuntime

__all__ = ["announce_end"]

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
    try:
        rt.redis.hincrby(OUTCOME_COUNTS_KEY, outcome, 1)
    except redis.RedisError as exc:
        log.warning("trial %s: could not count its outcome: %s", trial_id, exc)
    url = payload.get("callback_url")
    if not url:
        return
    event = trial_ended_event(
        trial_id, name=tags.get(TAG.RUN_NAME), status=client_status(run.info.status, outcome), outcome=outcome,
        reason=tags.get(TAG.REASON, ""), metrics=dict(run.data.metrics), study_id=tags.get(TAG.STUDY_ID),
    )
    from workers.celery_app import app

    try:
        app.send_task(TASK_DELIVER_CALLBACK, kwargs={"url": url, "event": event}, queue=CALLBACK_QUEUE, retry=True, retry_policy={"max_retries": 3})
        log.info("trial %s: callback queued for %s", trial_id, url)
    except Exception as exc:  # the broker is down: the trial has ended all the same
        log.error("trial %s: its callback could not be queued: %s", trial_id, exc)
