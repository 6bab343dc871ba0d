"""The API's part in callbacks: a trial the API ends itself (cancelled while queued) is announced here.

Trials that a worker runs are announced by the worker (``workers.callbacks.announce``). Either way the event is
a message on the ``callbacks`` queue, delivered, signed and retried by the callback worker
(``workers.callbacks.delivery``), so neither the API nor a GPU worker ever waits on a receiver.
"""

from __future__ import annotations

import logging

import redis

from models.callbacks import trial_ended_event
from models.messages import CALLBACK_QUEUE, CallbackMessage
from models.sealing import SealBroken
from models.store.keys import OUTCOME_COUNTS_KEY
from models.store.runs import TAG, run_spec
from models.store.share import Route
from models.store.teams import callback_team
from service.api.errors import ServiceUnavailable
from service.api.runs import RunRecord
from service.api.wiring import services

__all__ = ["notify_ended_by_api"]

log = logging.getLogger(__name__)


def notify_ended_by_api(record: RunRecord) -> None:
    """Count the ending for /metrics and queue the trial's callback, if it has one; never raises."""
    s = services()
    try:
        s.redis.hincrby(OUTCOME_COUNTS_KEY, record.outcome or "error", 1)
    except redis.RedisError as exc:
        log.warning("could not count the ending of trial %s: %s", record.id, exc)
    try:
        url = (run_spec(record.tags, s.settings.sealer()) or {}).get("callback_url")
    except SealBroken as exc:
        log.error("trial %s: its callback cannot be sent: %s", record.id, exc)
        return
    if not url:
        return
    event = trial_ended_event(
        record.id, name=record.tags.get(TAG.RUN_NAME), status=record.status, outcome=record.outcome or "error",
        reason=record.tags.get(TAG.REASON, ""), metrics=record.metrics, study_id=record.tags.get(TAG.STUDY_ID),
    )
    try:
        s.send(CallbackMessage(url=url, event=event, team=callback_team(record.tags)), Route(CALLBACK_QUEUE))
    except ServiceUnavailable as exc:  # the trial is cancelled all the same; say why its callback will not come
        log.error("trial %s: its callback could not be queued: %s", record.id, exc)
