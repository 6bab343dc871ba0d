"""The failure policy of every convtune task, decided once: :class:`ConvtuneTask` and :func:`task_options`.

A trial's own outcomes (diverged, out of memory, a bug in its spec...) end its run inside the task
(:func:`workers.training.outcomes.classify`). What escapes a task is one of two things:

- an **infrastructure error** (:func:`is_infrastructure`: MLflow unreachable, timing out or
  answering 5xx/429, Redis errors and timeouts, the broker refusing a message, ``OSError``, the
  study storage failing). The task is sent again with exponential backoff and full jitter
  (``retry_backoff_s`` doubled per retry, at most ``retry_backoff_max_s``) up to ``retry_max``
  times, about an hour with the defaults; the retry is a new message with the same task id, and
  the delivery that raised is acknowledged only once its retry is published. When the retry
  cannot be published (Redis down or stalled), the message is rejected *with* requeue: kombu puts
  it back on its queue, or, when even that fails, it stays in Redis' unacked set until the
  visibility timeout or the reconciler brings it back. It is never acked away.
- anything else (a bug: the same input fails the same way), and an infrastructure error whose
  retries are spent: the task fails for good. Before it does, :meth:`ConvtuneTask.retry` gives the
  work up: the task's ``abandon`` hook ends its run with outcome ``error`` and a reason naming the
  failure (best effort; when that fails too it is logged, and the reconciler finds the run).

Celery would do the opposite twice over: with ``task_acks_late`` and the default
``task_acks_on_failure_or_timeout`` an exception acks the message, and a retry it cannot publish
is ``Reject(requeue=False)``. Note that ``task_acks_on_failure_or_timeout = False`` does not keep a
failed message on Redis either (Celery 5.7 then rejects it without requeue, which kombu's Redis
transport implements as removing it): hence a task that fails for good gives its work up first. A retry for another reason than a failure (another worker holds the lease) is
:meth:`ConvtuneTask.check_again`, which does not count against ``retry_max``.

This module imports no torch and no MLflow (the light callback worker uses it too); MLflow's and
Optuna's exceptions are recognised once their modules are loaded, which they are wherever they
can be raised.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

from models.messages import NotSent
from workers.settings import WorkerSettings

__all__ = ["ConvtuneTask", "describe", "is_infrastructure", "task_options"]

log = logging.getLogger(__name__)
# Errors of the services convtune runs on, not of the work (OSError: sockets, a full or missing disk).
SERVICE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OperationalError, NotSent, OSError)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether ``exc`` says a service failed (retry later), not the work itself (a bug, a bad input)."""
    if isinstance(exc, SERVICE_ERRORS):
        return True
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException):
        # Unreachable, timed out, 5xx (INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE...) or rate limited;
        # a 4xx (RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE) is a fact about the request.
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    optuna_exceptions = sys.modules.get("optuna.exceptions")
    return optuna_exceptions is not None and isinstance(exc, optuna_exceptions.StorageInternalError)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for a run's reason."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConvtuneTask(Task):
    """Base of every convtune task: retries infrastructure errors with backoff, gives the rest up.

    Every exception a task raises comes here through Celery's ``autoretry_for`` (set to
    ``Exception`` by :func:`task_options`): :meth:`retry` retries what :meth:`retryable` accepts and
    gives up the rest. ``abandon(message, reason)``, set per task, ends the run the message carries.
    """

    # Per task (task_options' ``abandon``): end the run the message carries; called at most once per delivery.
    abandon: Callable[[dict[str, Any], str], None] | None = None
    # Exceptions a task retries besides infrastructure errors (a callback receiver's 5xx).
    retry_also: tuple[type[BaseException], ...] = ()

    def retryable(self, exc: BaseException) -> bool:
        return is_infrastructure(exc) or isinstance(exc, self.retry_also)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None, max_retries=None, **options):  # noqa: ANN001, ANN201
        """Send this task again after ``countdown`` for a retryable ``exc``; give the work up otherwise.

        Raises Retry (the retry is published), ``exc`` (given up: a bug, or retries spent) or
        Reject with requeue (the retry could not be published: the message goes back to Redis).
        """
        if exc is None or self.request.called_directly:  # an explicit retry, or a call in this process
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if not self.retryable(exc):
            self._give_up(f"failed: {describe(exc)}", exc)
            raise exc
        retries = self.request.retries
        if self.max_retries is not None and retries >= self.max_retries:
            self._give_up(f"infrastructure failure, given up after {retries} retries: {describe(exc)}", exc)
            raise exc
        log.warning("%s[%s]: %s; retry %d of %s in %ss", self.name, self.request.id, describe(exc), retries + 1, self.max_retries, countdown)
        try:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        except Reject as rejected:
            if rejected.requeue:
                raise
            log.error("%s[%s]: its retry could not be sent (%s); its message goes back to the broker", self.name, self.request.id, rejected.reason)
            raise Reject(rejected.reason, requeue=True) from exc

    def check_again(self, countdown: float) -> Retry:
        """Send this task again after ``countdown`` without counting a retry (another worker holds its lease).

        Returns the Retry to raise; raises Reject with requeue when the broker does not take it.
        """
        signature = self.signature_from_request(self.request, countdown=countdown)  # same retries count, same task id
        try:
            signature.apply_async()
        except Exception as exc:  # the broker is down: keep this delivery instead
            raise Reject(describe(exc), requeue=True) from exc
        return Retry(f"checking again in {countdown}s", when=countdown, sig=signature)

    def _give_up(self, reason: str, exc: BaseException) -> None:
        log.error("%s[%s] given up: %s", self.name, self.request.id, reason, exc_info=exc)
        if self.abandon is None:
            return
        try:
            self.abandon((self.request.kwargs or {}).get("message") or {}, reason)
        except Exception:
            log.exception("%s[%s]: its run could not be ended; the reconciler will find it", self.name, self.request.id)


def task_options(settings: WorkerSettings, abandon: Callable[[dict[str, Any], str], None] | None = None, **overrides: Any) -> dict[str, Any]:
    """The options of a convtune task (``@app.task(name=..., **task_options(settings, abandon))``).

    ``abandon(message, reason)`` ends the run ``message`` carries when the task gives up.
    """
    return {
        "base": ConvtuneTask, "bind": True, "acks_late": True,
        "autoretry_for": (Exception,), "dont_autoretry_for": (Reject,), "retry_backoff": settings.retry_backoff_s, "retry_backoff_max": settings.retry_backoff_max_s,
        "retry_jitter": True, "max_retries": settings.retry_max,
        "abandon": None if abandon is None else staticmethod(abandon),
        **overrides,
    }
