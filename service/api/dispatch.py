"""Accepting a trial: check it, record it in MLflow, then hand it to a worker through Celery.

The order is the contract (DESIGN decision 3): the run exists before the message is sent, and a
message that cannot be sent ends the run as failed before the client hears 503. Nothing is
half-accepted and nothing is left ``queued`` forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis
from celery import Celery

from models.data.sets import InvalidData, describe
from models.messages import TASK_RUN_TRIAL, celery_config
from models.store.keys import cancel_key
from models.spec.plan import InfeasibleSpec as InfeasibleArchitecture
from models.spec.plan import NetworkPlan, plan_network
from models.spec.trial import TrialSpec
from service.api.errors import FieldError, InfeasibleSpec, InvalidSpec, ServiceUnavailable
from service.api.runs import RunStore
from service.api.settings import ApiSettings

__all__ = ["Dispatcher", "TaskSender", "check_callback_url", "check_feasible"]

log = logging.getLogger(__name__)


class TaskSender:
    """Sends trial messages to the workers' queues; a Celery app used only to send."""

    def __init__(self, settings: ApiSettings):
        self.celery = Celery("convtune-api", set_as_current=False)
        self.celery.conf.update(celery_config(settings.redis_url, settings.visibility_timeout_s))

    def send(self, task: str, kwargs: dict, queue: str, task_id: str, what: str) -> None:
        """Publish one message of ``task``; raises ServiceUnavailable when the broker does not take it."""
        try:
            self.celery.send_task(task, kwargs=kwargs, queue=queue, task_id=task_id, retry=False)
        except Exception as exc:  # kombu raises OperationalError, redis ConnectionError, OSError...
            raise ServiceUnavailable(f"the broker (Redis) did not accept the {what}: {exc}") from exc

    def send_trial(self, trial_id: str, spec: TrialSpec, queue: str) -> None:
        """Publish one trial; raises ServiceUnavailable when the broker does not take it."""
        try:
            self.celery.send_task(
                TASK_RUN_TRIAL, kwargs={"trial_id": trial_id, "spec": spec.model_dump(mode="json")},
                queue=queue, task_id=trial_id, retry=False,
            )
        except Exception as exc:  # kombu raises OperationalError, redis ConnectionError, OSError...
            raise ServiceUnavailable(f"the broker (Redis) did not accept the trial: {exc}") from exc


def check_feasible(spec: TrialSpec, data_root: Path | None) -> NetworkPlan | None:
    """Size the network on its data without torch; None when only the workers can see the data.

    Raises InvalidSpec when user data is unusable and InfeasibleSpec naming the layer and sizes.
    """
    try:
        info = describe(spec.data, data_root)
    except InvalidData as exc:
        raise InvalidSpec(str(exc), errors=[FieldError(field="data.path", message=str(exc))]) from exc
    if info is None:
        return None
    try:
        return plan_network(spec.model, info)
    except InfeasibleArchitecture as exc:
        raise InfeasibleSpec(str(exc), errors=[FieldError(field=exc.field, message=str(exc))]) from exc


def check_callback_url(url: object | None, allowed: list[str] | None, field: str) -> None:
    """Refuse (422 on ``field``) a callback URL whose host is not in ``allowed``, when there is such a list.

    Workers POST to the URL from inside the network: without a list, a token holder can aim them at
    internal addresses (``CONVTUNE_CALLBACK_HOSTS``).
    """
    if url is None or allowed is None:
        return
    host = (urlsplit(str(url)).hostname or "").lower()
    for pattern in (p.lower() for p in allowed):
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return
    message = f"callbacks may only go to {', '.join(allowed) or 'no host'} on this service, not {host!r}"
    raise InvalidSpec(message, errors=[FieldError(field=field, message=message)])


@dataclass
class Accepted:
    trial_id: str
    queue: str
    plan: NetworkPlan | None


class Dispatcher:
    """The API's side of a trial's life: accept it, cancel it."""

    def __init__(self, settings: ApiSettings, runs: RunStore, sender: TaskSender, redis_client: redis.Redis):
        self.settings = settings
        self.runs = runs
        self.sender = sender
        self.redis = redis_client

    def accept(self, spec: TrialSpec, extra_tags: dict[str, str] | None = None) -> Accepted:
        """Validate feasibility, create the SCHEDULED run, send the message; 503 leaves the run failed."""
        if spec.optim.epochs > self.settings.max_epochs:
            message = f"at most {self.settings.max_epochs} epochs are allowed on this service"
            raise InvalidSpec(message, errors=[FieldError(field="optim.epochs", message=message)])
        check_callback_url(spec.callback_url, self.settings.callback_hosts, "callback_url")
        plan = check_feasible(spec, self.settings.data_root)
        if plan is not None and plan.params > self.settings.max_params:
            message = f"the network has {plan.params:,} parameters; this service allows at most {self.settings.max_params:,}"
            raise InvalidSpec(message, errors=[FieldError(field="model.channels", message=message)])
        queue = spec.queue or self.settings.default_queue
        trial_id = self.runs.create_trial(spec, plan, queue, extra_tags)
        try:
            self.sender.send_trial(trial_id, spec, queue)
        except ServiceUnavailable as exc:
            log.warning("trial %s not sent, marking it failed: %s", trial_id, exc.detail)
            self.runs.end(trial_id, "FAILED", "error", f"not dispatched: {exc.detail}")
            raise
        log.info("trial %s accepted on queue %s", trial_id, queue)
        return Accepted(trial_id, queue, plan)

    def request_cancel(self, trial_id: str, was_queued: bool) -> None:
        """Raise the cancel flag the training loop checks; end a trial no worker has started yet."""
        try:
            self.redis.set(cancel_key(trial_id), "1", ex=self.settings.visibility_timeout_s * 2)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
        if was_queued:
            # The worker that later receives the message sees the ended run and skips it.
            self.runs.end(trial_id, "KILLED", "cancelled", "cancelled on request before it started")
