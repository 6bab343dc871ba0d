"""The Celery task: thin, like a view. Parse, call :func:`workers.execution.execute_trial`, report."""

from __future__ import annotations

import logging
from functools import lru_cache

from models.logs import log_context
from models.protocol import TAG, TASK_RUN_TRIAL
from workers.celery_app import app
from workers.execution import LeaseHeld, WorkerRuntime, execute_trial
from workers.notify import announce_end
from workers.settings import WorkerSettings

__all__ = ["run_trial_task", "runtime"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def runtime() -> WorkerRuntime:
    """This process's clients and device, built on first use."""
    return WorkerRuntime(WorkerSettings())


@app.task(name=TASK_RUN_TRIAL, bind=True, max_retries=None)
def run_trial_task(self, trial_id: str, spec: dict) -> str:
    """Train one trial; its outcome is recorded in its MLflow run, and returned."""
    with log_context(trial_id=trial_id, study_id=(spec.get("tags") or {}).get(TAG.STUDY_ID)):
        try:
            outcome = execute_trial(trial_id, spec, runtime())
        except LeaseHeld as held:
            # Another worker is training it (a duplicate delivery): look again once its lease could lapse.
            log.info("trial %s: %s; checking again in %ss", trial_id, held, held.retry_in_s)
            raise self.retry(countdown=held.retry_in_s) from held
        if outcome != "skipped":
            announce_end(trial_id, spec, runtime())
        return outcome
