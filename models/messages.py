"""The messages between the API and the workers: Celery task names, queues and settings.

Both sides import this torch-free module instead of each other, so neither process needs the
other's code to agree on the wire format.
"""

from __future__ import annotations

__all__ = ["CALLBACK_QUEUE", "QUEUES", "TASK_DELIVER_CALLBACK", "TASK_LR_FIND", "TASK_RUN_TRIAL", "TASK_STUDY_STEP", "celery_config"]

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


def celery_config(broker_url: str, visibility_timeout_s: int) -> dict:
    """Celery settings the API (sender) and the workers must agree on.

    JSON only; late acks so a trial whose worker dies is redelivered; the same visibility timeout
    on both sides, since Redis redelivers any message unacknowledged for that long (celery#5935).
    Execution is idempotent through a per-trial lease, so a second delivery is harmless.
    """
    transport = {"visibility_timeout": visibility_timeout_s}
    return {
        "broker_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "gpu",
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }
