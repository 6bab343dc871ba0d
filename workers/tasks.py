"""The Celery tasks: thin, like views. Parse the message, call the plain function, report."""

from __future__ import annotations

import logging

from models.logs import log_context
from models.messages import TASK_LR_FIND, TASK_RUN_TRIAL, TASK_STUDY_STEP, RangeTestMessage, StudyStepMessage, TrialMessage, send
from models.store.runs import TAG
from workers.callbacks.announce import announce_end
from workers.celery_app import app
from workers.runtime import runtime
from workers.study.step import execute_step
from workers.trial.execution import LeaseHeld, execute_trial
from workers.trial.lr_finder import execute_lr_find

__all__ = ["lr_find_task", "study_step_task", "trial_task"]

log = logging.getLogger(__name__)


@app.task(name=TASK_RUN_TRIAL, bind=True, max_retries=None)
def trial_task(self, message: dict) -> str:
    """Train one trial; its outcome is recorded in its MLflow run, and returned."""
    msg = TrialMessage.model_validate(message)
    with log_context(trial_id=msg.trial_id, study_id=(msg.spec.get("tags") or {}).get(TAG.STUDY_ID)):
        try:
            ending = execute_trial(msg.trial_id, msg.spec, runtime())
        except LeaseHeld as held:
            # Another worker is training it (a duplicate delivery): look again once its lease could lapse.
            log.info("trial %s: %s; checking again in %ss", msg.trial_id, held, held.retry_in_s)
            raise self.retry(countdown=held.retry_in_s) from held
        if ending is None:
            return "skipped"
        announce_end(msg.trial_id, ending, msg.spec.get("callback_url"), runtime())
        return ending.outcome


@app.task(name=TASK_STUDY_STEP, bind=True, max_retries=None)
def study_step_task(self, message: dict) -> str:
    """Run one trial of a study, then send the study's next steps (see :mod:`workers.study.step`)."""
    msg = StudyStepMessage.model_validate(message)

    def send_step(study_id: str, slot: int, queue: str) -> None:
        send(app, StudyStepMessage(study_id=study_id, slot=slot), queue)

    with log_context(study_id=msg.study_id):
        try:
            return execute_step(msg.study_id, msg.slot, runtime(), send_step)
        except LeaseHeld as held:
            log.info("study %s: %s; checking again in %ss", msg.study_id, held, held.retry_in_s)
            raise self.retry(countdown=held.retry_in_s) from held


@app.task(name=TASK_LR_FIND)
def lr_find_task(message: dict) -> str:
    """Run one learning-rate range test; its result is recorded in its MLflow run (see :mod:`workers.trial.lr_finder`)."""
    msg = RangeTestMessage.model_validate(message)
    with log_context(trial_id=msg.run_id):
        return execute_lr_find(msg.run_id, msg.spec, runtime())
