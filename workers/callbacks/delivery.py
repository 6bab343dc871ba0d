"""Delivering callbacks: POST the event, signed, to the spec's ``callback_url``; retry with backoff.

A receiver's 2xx ends the delivery. A network error, a timeout, a 408, a 429 or a 5xx is retried
after ``callback_backoff_s * 2**n`` seconds (with jitter, capped at ``callback_backoff_max_s``), up
to ``callback_max_retries`` times; any other 4xx means the receiver refuses the event, and it is
dropped with an error logged. Retries are Celery messages with a countdown, so they survive a
restart of this worker.
"""

from __future__ import annotations

import logging
import random
from functools import lru_cache

import httpx

from models.callbacks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, encode, sign
from models.logs import log_context
from models.messages import TASK_DELIVER_CALLBACK
from workers.callbacks.app import app
from workers.settings import WorkerSettings

__all__ = ["deliver_callback", "post_event"]

log = logging.getLogger(__name__)
RETRIED_STATUSES = frozenset({408, 425, 429})


class RetryableDelivery(Exception):
    """The receiver could not take the event now; try again later."""


@lru_cache(maxsize=1)
def _settings() -> WorkerSettings:
    settings = WorkerSettings()
    if not settings.callback_secret:
        log.warning("CONVTUNE_CALLBACK_SECRET is not set: callbacks are sent unsigned, and receivers cannot trust them")
    return settings


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


@app.task(name=TASK_DELIVER_CALLBACK, bind=True, max_retries=None, acks_late=True)
def deliver_callback(self, url: str, event: dict) -> str:
    """Deliver ``event`` to ``url``; retried with exponential backoff while the receiver fails."""
    settings = _settings()
    trial = event.get("trial") or {}
    with log_context(trial_id=trial.get("id"), study_id=trial.get("study_id") or (event.get("study") or {}).get("id")):
        try:
            status = post_event(url, event, settings)
        except RetryableDelivery as exc:
            if self.request.retries >= settings.callback_max_retries:
                log.error("callback %s to %s given up after %d attempts: %s", event["delivery_id"], url, self.request.retries + 1, exc)
                return "given_up"
            delay = min(settings.callback_backoff_s * 2**self.request.retries, settings.callback_backoff_max_s)
            delay *= random.uniform(0.8, 1.2)
            log.warning("callback %s to %s failed (%s); retry %d in %.1fs", event["delivery_id"], url, exc, self.request.retries + 1, delay)
            raise self.retry(countdown=delay) from exc
        if status >= 400:
            log.error("callback %s to %s refused with %d; not retried", event["delivery_id"], url, status)
            return "refused"
        log.info("callback %s delivered to %s (%d)", event["delivery_id"], url, status)
        return "delivered"
