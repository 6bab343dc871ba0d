"""Delivering callbacks: POST the event, signed for its team, to the spec's ``callback_url``; Celery retries it with backoff.

Each delivery is signed as Standard Webhooks specify (:mod:`models.callbacks`) with its team's key,
derived from the service's secret key; without a secret key nothing is sent (refused, logged).
A receiver's 2xx ends the delivery. A network error, a timeout (a DNS lookup past
``callback_resolve_timeout_s`` included), a 408, a 425, a 429 or a 5xx raises
:class:`RetryableDelivery`, which Celery retries (``autoretry_for``) up to ``callback_max_retries``
times, the n-th retry after a random delay between 0 and ``callback_backoff_s * 2**n`` seconds,
capped at ``callback_backoff_max_s`` (Celery's exponential backoff with full jitter, in whole
seconds: a backoff under 1 s counts as 1 s). Infrastructure errors (Redis, the broker) follow the
same policy as every convtune task (:mod:`workers.failures`), with these numbers: a retry that
cannot be sent puts the message back on the broker. Once the retries are spent the task fails and
the event is dropped with an error logged. Any other 4xx means the receiver refuses the event: it is
dropped with an error logged, never retried. Retries are Celery messages with a countdown, so they
survive a restart of this worker. The policy is read from the worker's settings when the worker
starts (:data:`workers.callbacks.app.settings`).
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as ResolveTimeout
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from celery import Task

from models.callbacks import EVENT_HEADER, delivery_body, shown_url, signed_headers
from models.compat import httpx_transport
from models.logs import log_context
from models.messages import TASK_DELIVER_CALLBACK, CallbackMessage
from workers.callbacks.app import app, settings
from workers.errors import WorkerError
from workers.failures import task_options
from workers.settings import WorkerSettings

__all__ = ["RefusedDestination", "RetryableDelivery", "deliver_callback", "post_event", "resolve"]

log = logging.getLogger(__name__)
RETRIED_STATUSES = frozenset({408, 425, 429})
# getaddrinfo takes no timeout: lookups run here, and a delivery waits at most callback_resolve_timeout_s for
# one, so a receiver's black-hole domain holds a lookup thread, never the callback worker's threads.
_resolver = ThreadPoolExecutor(max_workers=8, thread_name_prefix="callback-dns")


class RetryableDelivery(WorkerError):
    """The receiver could not take the event now; try again later."""


class RefusedDestination(WorkerError):
    """The callback's address or port is one callbacks may not reach (private, loopback, metadata...)."""


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses callbacks may reach: the check is on the address actually connected to,
    after DNS, so a name that resolves (or re-resolves) to a private address is refused."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Any = None) -> Any:
        addresses = resolve(host, port, self.settings.callback_resolve_timeout_s)
        for address in addresses:  # every address the name has must be allowed, or rebinding picks the bad one
            problem = self.settings.destination_problem(address, port)
            if problem:
                raise RefusedDestination(f"{host} resolves to {address}: {problem}")
        # TLS still verifies and sends SNI for the host name: httpcore takes it from the URL, not from here.
        return super().connect_tcp(addresses[0], port, timeout=timeout, local_address=local_address, socket_options=socket_options)


def resolve(host: str, port: int, timeout_s: float) -> list[str]:
    """The addresses ``host`` resolves to; httpcore.ConnectTimeout past ``timeout_s``, ConnectError when it does not.

    Both are retried later like any connection error (the name may resolve then).
    """
    lookup = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=timeout_s)
    except ResolveTimeout as exc:
        lookup.cancel()  # still queued behind stuck lookups: never run it
        raise httpcore.ConnectTimeout(f"{host} did not resolve within {timeout_s:g}s") from exc
    except (OSError, UnicodeError) as exc:
        raise httpcore.ConnectError(f"{host}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _client(settings: WorkerSettings) -> httpx.Client:
    """An HTTP client that connects only where callbacks may go; no proxies from the environment, no redirects."""
    transport = httpx_transport.transport_through(_GuardedBackend(settings))
    return httpx.Client(transport=transport, trust_env=False, follow_redirects=False, timeout=settings.callback_timeout_s)


def post_event(url: str, event: dict, settings: WorkerSettings, team: str | None = None) -> int:
    """POST one event, signed with ``team``'s keys; the receiver's status. Raises RetryableDelivery for a retryable failure,
    RefusedDestination when it may not be sent (the address, or no secret key to sign it with)."""
    keys = settings.webhook_keys(team)
    if not keys:
        raise RefusedDestination("this service has no secret key (CONVTUNE_SECRET_KEY) to sign callbacks with")
    body = delivery_body(event, team, url)
    headers = {
        "Content-Type": "application/json", EVENT_HEADER: event["event"], "User-Agent": "convtune-callbacks",
        **signed_headers(keys, event["delivery_id"], body),  # webhook-id: the same on every retry of this event
    }
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedDestination(f"callbacks go over http or https, not {parts.scheme!r}")
    try:
        with _client(settings) as client:
            response = client.post(url, content=body, headers=headers)
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
    name=TASK_DELIVER_CALLBACK,
    **task_options(
        settings, retry_also=(RetryableDelivery,), max_retries=settings.callback_max_retries,
        retry_backoff=settings.callback_backoff_s, retry_backoff_max=int(settings.callback_backoff_max_s),
    ),
)
def deliver_callback(self: Task, message: dict) -> str:
    """Deliver the message's event to its URL; a RetryableDelivery is retried by Celery, with backoff."""
    msg = CallbackMessage.model_validate(message)
    delivery = msg.event["delivery_id"]
    with log_context(**_event_ids(msg.event)):
        where = shown_url(msg.url)  # a webhook URL often carries a token: logs name only its host
        try:
            status = post_event(msg.url, msg.event, settings, msg.team)
        except RefusedDestination as exc:
            log.error("callback %s to %s refused by this service: %s; not retried", delivery, where, exc)
            return "refused"
        except RetryableDelivery as exc:
            attempt = self.request.retries + 1
            if self.request.retries < self.max_retries:
                log.warning("callback %s to %s failed on attempt %d (%s); retry after a backoff", delivery, where, attempt, exc)
            else:
                log.error("callback %s to %s given up after %d attempts: %s", delivery, where, attempt, exc)
            raise  # autoretry_for: Celery sends the retry, or fails the task once the retries are spent
        if status >= 400:
            log.error("callback %s to %s refused with %d; not retried", delivery, where, status)
            return "refused"
        log.info("callback %s delivered to %s (%d)", delivery, where, status)
        return "delivered"
