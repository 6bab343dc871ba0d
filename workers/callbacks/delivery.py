"""Delivering callbacks: POST the event, signed, to the spec's ``callback_url``; Celery retries it with backoff.

A receiver's 2xx ends the delivery. A network error, a timeout, a 408, a 425, a 429 or a 5xx raises
:class:`RetryableDelivery`, which Celery retries (``autoretry_for``) up to ``callback_max_retries``
times, the n-th retry after a random delay between 0 and ``callback_backoff_s * 2**n`` seconds,
capped at ``callback_backoff_max_s`` (Celery's exponential backoff with full jitter, in whole
seconds: a backoff under 1 s counts as 1 s). Once the retries are spent the task fails and the
event is dropped with an error logged. Any other 4xx means the receiver refuses the event: it is
dropped with an error logged, never retried. Retries are Celery messages with a countdown, so they
survive a restart of this worker. The policy is read from the worker's settings when the worker
starts (:data:`workers.callbacks.app.settings`).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from celery import Task

from models.callbacks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, encode, sign
from models.logs import log_context
from models.messages import TASK_DELIVER_CALLBACK, CallbackMessage
from workers.callbacks.app import app, settings
from workers.settings import WorkerSettings

__all__ = ["RetryableDelivery", "deliver_callback", "post_event"]

log = logging.getLogger(__name__)
RETRIED_STATUSES = frozenset({408, 425, 429})


class RetryableDelivery(Exception):
    """The receiver could not take the event now; try again later."""


def post_event(url: str, event: dict, settings: WorkerSettings) -> int:
    """POST one signed event; the receiver's status. Raises RetryableDelivery for a retryable failure."""
    body = encode(event)
    headers = {"Content-Type": "application/json", EVENT_HEADER: event["event"], DELIVERY_HEADER: event["delivery_id"], "User-Agent": "convtune-callbacks"}
    if settings.callback_secret:
        headers[SIGNATURE_HEADER] = sign(settings.callback_secret, body)
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=settings.callback_timeout_s)
    except httpx.HTTPError as exc:
        raise RetryableDelivery(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500 or response.status_code in RETRIED_STATUSES:
        raise RetryableDelivery(f"the receiver answered {response.status_code}")
    return response.status_code


def _event_ids(event: dict[str, Any]) -> dict[str, str | None]:
    """The ids a delivery's log lines carry: the trial's, and its study's or the study's own."""
    trial = event.get("trial") or {}
    return {"trial_id": trial.get("id"), "study_id": trial.get("study_id") or (event.get("study") or {}).get("id")}


@app.task(
    name=TASK_DELIVER_CALLBACK, bind=True, acks_late=True,
    autoretry_for=(RetryableDelivery,), max_retries=settings.callback_max_retries,
    retry_backoff=settings.callback_backoff_s, retry_backoff_max=int(settings.callback_backoff_max_s), retry_jitter=True,
)
def deliver_callback(self: Task, message: dict) -> str:
    """Deliver the message's event to its URL; a RetryableDelivery is retried by Celery, with backoff."""
    msg = CallbackMessage.model_validate(message)
    delivery = msg.event["delivery_id"]
    with log_context(**_event_ids(msg.event)):
        try:
            status = post_event(msg.url, msg.event, settings)
        except RetryableDelivery as exc:
            attempt = self.request.retries + 1
            if self.request.retries < self.max_retries:
                log.warning("callback %s to %s failed on attempt %d (%s); retry after a backoff", delivery, msg.url, attempt, exc)
            else:
                log.error("callback %s to %s given up after %d attempts: %s", delivery, msg.url, attempt, exc)
            raise  # autoretry_for: Celery sends the retry, or fails the task once the retries are spent
        if status >= 400:
            log.error("callback %s to %s refused with %d; not retried", delivery, msg.url, status)
            return "refused"
        log.info("callback %s delivered to %s (%d)", delivery, msg.url, status)
        return "delivered"
