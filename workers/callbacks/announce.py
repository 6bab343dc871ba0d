"""After a run ends on this worker: count its outcome for /metrics and queue its callback.

Called once the run has ended (never for a skipped duplicate delivery). Queuing is one Redis push:
the delivery itself, with its retries, happens on the callback worker, so a slow or dead receiver
never holds this GPU. Never raises: the run has ended whatever happens to its announcement.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from mlflow.exceptions import MlflowException

from models.callbacks import shown_url, study_ended_event, trial_ended_event
from models.messages import CALLBACK_QUEUE, CallbackMessage, NotSent, send
from models.store.keys import OUTCOME_COUNTS_KEY
from models.store.runs import TAG, client_status, study_state
from models.store.teams import callback_team
from workers.celery_app import app
from workers.runtime import WorkerRuntime
from workers.training.outcomes import Ending

__all__ = ["announce_end", "announce_study_end", "count_outcome"]

log = logging.getLogger(__name__)


def announce_end(trial_id: str, ending: Ending, callback_url: str | None, rt: WorkerRuntime) -> None:
    """Count the trial's outcome and, when it has a ``callback_url``, queue its ``trial.ended`` event."""
    count_outcome(rt, ending.outcome)
    if not callback_url:
        return
    try:
        run = rt.mlflow.get_run(trial_id)  # the event carries the final metrics
    except (MlflowException, OSError) as exc:
        log.error("trial %s ended but its metrics could not be read for its callback: %s", trial_id, exc)
        return
    event = trial_ended_event(
        trial_id, name=run.data.tags.get(TAG.RUN_NAME), status=client_status(ending.mlflow_status, ending.outcome), outcome=ending.outcome,
        reason=ending.reason, metrics=dict(run.data.metrics), study_id=run.data.tags.get(TAG.STUDY_ID),
    )
    _queue_callback(callback_url, callback_team(run.data.tags), event, f"trial {trial_id}")


def count_outcome(rt: WorkerRuntime, outcome: str) -> None:
    """Count one more trial ended with ``outcome`` (``convtune_trials_ended_total`` on /metrics)."""
    try:
        rt.redis.hincrby(OUTCOME_COUNTS_KEY, outcome, 1)
    except redis.RedisError as exc:
        log.warning("could not count a trial's outcome (%s): %s", outcome, exc)


def announce_study_end(
    study_id: str, callback_url: str | None, *, team: str | None, name: str | None, ending: Ending, best: dict[str, Any] | None, counts: dict[str, int],
) -> None:
    """Send a study's ``study.ended`` event, for its ``team``, to the callbacks queue, when it has a callback_url."""
    if not callback_url:
        return
    event = study_ended_event(
        study_id, name=name, state=study_state(ending.mlflow_status), outcome=ending.outcome, reason=ending.reason, best=best, counts=counts,
    )
    _queue_callback(callback_url, team, event, f"study {study_id}")


def _queue_callback(url: str, team: str | None, event: dict[str, Any], what: str) -> None:
    try:
        send(app, CallbackMessage(url=url, event=event, team=team), CALLBACK_QUEUE)
        log.info("%s: callback queued for %s", what, shown_url(url))
    except NotSent as exc:  # the broker is down: it has ended all the same
        log.error("%s: its callback could not be queued: %s", what, exc)
