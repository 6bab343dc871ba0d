"""The Celery task: thin, like a view. Parse, call :func:`workers.trial.execution.execute_trial`, report."""

from __future__ import annotations

import logging
from functools import lru_cache

from models.logs import log_context
from models.messages import TASK_LR_FIND, TASK_RUN_TRIAL, TASK_STUDY_STEP
from models.store.runs import TAG
from workers.celery_app import app
from workers.trial.execution import LeaseHeld, WorkerRuntime, execute_trial
from workers.callbacks.announce import announce_end
from workers.settings import WorkerSettings

__all__ = ["lr_find_task", "run_trial_task", "runtime", "study_step_task"]

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


@app.task(name=TASK_STUDY_STEP, bind=True, max_retries=None)
def study_step_task(self, study_id: str, slot: int) -> str:
    """Run one trial of a study, then send the study's next steps (see :mod:`workers.study.step`)."""
    from workers.study.step import execute_step

    def send(study: str, next_slot: int, queue: str) -> None:
        # kombu retries a blip of the broker; the step holding the slot is the only one that can send it.
        app.send_task(TASK_STUDY_STEP, kwargs={"study_id": study, "slot": next_slot}, queue=queue, task_id=f"{study}-{next_slot}", retry=True)

    with log_context(study_id=study_id):
        try:
            return execute_step(study_id, slot, runtime(), send)
        except LeaseHeld as held:
            log.info("study %s: %s; checking again in %ss", study_id, held, held.retry_in_s)
            raise self.retry(countdown=held.retry_in_s) from held


@app.task(name=TASK_LR_FIND)
def lr_find_task(run_id: str, spec: dict) -> str:
    """Run one learning-rate range test; its result is recorded in its MLflow run (see :mod:`workers.trial.lr_finder`)."""
    from workers.trial.lr_finder import execute_lr_find

    with log_context(trial_id=run_id):
        return execute_lr_find(run_id, spec, runtime())
