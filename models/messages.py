"""The messages between the API and the workers: one pydantic model per task kind, and :func:`send`.

Both sides import this torch-free module instead of each other, so neither process needs the
other's code to agree on the wire format. Every message travels as JSON in one keyword argument,
``message``; each task parses it back with its model (``TrialMessage.model_validate(message)``).
The task id is derived from the message, so sending the same message twice (a retry, the
reconciler) names the same work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from models.compat import CompatError, kombu_redis
from models.compat.kombu_redis import UNACKED_INDEX_KEY, UNACKED_KEY, queue_lists
from models.errors import ConvtuneError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "CALLBACK_QUEUE", "QUEUES", "TASK_DELIVER_CALLBACK", "TASK_LR_FIND", "TASK_RUN_TRIAL", "TASK_STUDY_STEP",
    "UNACKED_INDEX_KEY", "UNACKED_KEY", "CallbackMessage", "Message", "NotSent", "RangeTestMessage", "StudyStepMessage", "TrialMessage",
    "celery_config", "give_back", "queue_lists", "send",
]

TASK_RUN_TRIAL = "convtune.run_trial"
# A learning-rate range test (workers.trial.lr_finder); its MLflow run is tagged TAG.KIND = KIND.LR_FINDER.
TASK_LR_FIND = "convtune.lr_find"
# One step of a study: run one of its trials, then send the next steps (workers.study.step).
TASK_STUDY_STEP = "convtune.study_step"
# Callbacks (a POST to the spec's callback_url when a trial or study ends) travel on their own
# queue, consumed by a light worker (workers.callbacks.app), so a slow receiver never holds a GPU.
TASK_DELIVER_CALLBACK = "convtune.deliver_callback"
CALLBACK_QUEUE = "callbacks"
QUEUES = ("gpu", "cpu")
# A team's waiting queue for a device queue is named "<queue><SHARE_INFIX><team>" (models.store.share).
SHARE_INFIX = ".share."
# Where kombu's Redis transport keeps waiting and unacked messages (queue_lists, UNACKED_KEY,
# UNACKED_INDEX_KEY) is kombu's layout, assumed in one place: models.compat.kombu_redis.


class NotSent(ConvtuneError):
    """The broker did not take the message (Redis down, stalled or refusing)."""


class Message(BaseModel):
    """A task's payload; ``task`` names the Celery task that consumes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: ClassVar[str]

    @property
    def task_id(self) -> str | None:
        return None


class TrialMessage(Message):
    """Train one trial. ``spec`` is the TrialSpec as JSON: the worker validates it again."""

    task: ClassVar[str] = TASK_RUN_TRIAL
    trial_id: str
    spec: dict[str, Any]

    @property
    def task_id(self) -> str:
        return self.trial_id


class RangeTestMessage(Message):
    """Run one LR range test. ``spec`` is the LrRangeSpec as JSON."""

    task: ClassVar[str] = TASK_LR_FIND
    run_id: str
    spec: dict[str, Any]

    @property
    def task_id(self) -> str:
        return self.run_id


class StudyStepMessage(Message):
    """Run the trial of one of a study's slots (models.store.budget), then send the next steps."""

    task: ClassVar[str] = TASK_STUDY_STEP
    study_id: str
    slot: int

    @property
    def task_id(self) -> str:
        return f"{self.study_id}-{self.slot}"


class CallbackMessage(Message):
    """POST ``event`` (models.callbacks) to ``url``, signed with the key of ``team`` (the run's; None without teams)."""

    task: ClassVar[str] = TASK_DELIVER_CALLBACK
    url: str
    event: dict[str, Any]
    team: str | None = None


def send(celery: Celery, message: Message, queue: str, *, priority: int | None = None) -> None:
    """Publish ``message`` on ``queue`` (kombu's ``priority``: 0 is taken first); raises NotSent when the broker does not take it.

    Sends once (no kombu retry loop): the caller decides whether to answer 503 or to retry later.
    Work for the workers goes through :class:`models.store.share.Share`, which picks the queue.
    """
    try:
        celery.send_task(
            message.task, kwargs={"message": message.model_dump(mode="json")}, queue=queue, task_id=message.task_id, retry=False, priority=priority,
        )
    except Exception as exc:  # kombu OperationalError, redis ConnectionError/TimeoutError, OSError...
        raise NotSent(f"the broker (Redis) did not take the {message.task} message: {exc}") from exc


def give_back(client: Any, tag: bytes | str, raw: bytes) -> bool:
    """Put a message held unacked back on its queue, as kombu's ``QoS.restore_by_tag`` does; whether it was.

    ``raw`` is the ``unacked`` hash's value for ``tag`` as read (``[message, exchange, routing key]``).
    One script: the message is pushed on its queue's list (the right end, which workers take first,
    marked redelivered) and removed from ``unacked`` and ``unacked_index``, only while the tag
    still holds ``raw``; a worker that acked it meanwhile keeps it acked. Its queue is its routing
    key: a team's waiting queue (``gpu.share.<team>``) for work dispatched by the fair share, which
    feeds it again. A message whose queue is not one of convtune's, or not of kombu's shape, is left
    for Redis' visibility timeout. Raises
    CompatError when the installed kombu keeps its messages elsewhere (:mod:`models.compat.kombu_redis`).
    """
    kombu_redis.check_layout()
    try:
        routing_key = kombu_redis.unacked_value(raw)[2]
        if routing_key not in (*QUEUES, CALLBACK_QUEUE) and routing_key.partition(SHARE_INFIX)[0] not in QUEUES:
            return False
        return kombu_redis.restore_unacked(client, tag, raw)
    except CompatError:  # not a message kombu wrote
        return False


def celery_config(broker_url: str, visibility_timeout_s: int, *, socket_timeout_s: float = 10.0, sender: bool = False) -> dict:
    """Celery settings the API (sender) and the workers must agree on.

    JSON only; late acks so a trial whose worker dies is redelivered; the same visibility timeout
    on both sides, since Redis redelivers any message unacknowledged for that long (celery#5935).
    Execution is idempotent through a per-trial lease, so a second delivery is harmless. A task
    that raises is retried or given up by the workers' policy (workers.failures), never acked
    away. ``socket_timeout_s`` bounds every broker command and connection attempt (without it, a
    Redis that stalls, e.g. CLIENT PAUSE, hangs a publish forever); a ``sender`` (the API) also
    tries to connect once, not for seconds, so a request answers 503 quickly.
    """
    transport: dict = {"visibility_timeout": visibility_timeout_s, "socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s}
    if sender:
        # kombu's connection retries (Connection._ensure_connection) read these; the default waits 2 s, then 4 s.
        transport.update({"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2})
    return {
        "broker_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        # Not enough to keep a failed message on Redis (Celery then rejects it without requeue, which
        # removes it): workers.failures retries or gives up what a task raises.
        "task_acks_on_failure_or_timeout": False,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "gpu",
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": min(3.0, socket_timeout_s),  # to connect, all attempts included
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }
