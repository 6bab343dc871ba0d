"""The Celery tasks: thin, like views. Parse the message, call the plain function, report.

Every task follows one failure policy (:mod:`workers.failures`): infrastructure errors are retried
with backoff, and a task that gives up ends its run as ``error`` through its ``abandon`` function
here. A delivery that finds the run's lease held looks again later (``check_again``, not counted
as a retry); one whose worker lost the lease midway (Superseded) ends without writing anything.
"""

from __future__ import annotations

import logging

from models.logs import log_context
from models.messages import TASK_LR_FIND, TASK_RUN_TRIAL, TASK_STUDY_STEP, RangeTestMessage, StudyStepMessage, TrialMessage
from models.store.runs import TAG
from models.store.share import Route
from workers.callbacks.announce import announce_end
from workers.celery_app import app, settings, share
from workers.failures import task_options
from workers.runtime import runtime
from workers.study.step import abandon_step, execute_step
from workers.training.outcomes import Superseded
from workers.trial.execution import LeaseHeld, abandon_run, execute_trial
from workers.trial.lr_finder import execute_lr_find

__all__ = ["lr_find_task", "study_step_task", "trial_task"]

log = logging.getLogger(__name__)


def abandon_trial(message: dict, reason: str) -> None:
    """End a given-up trial as ``error`` (unless another worker holds it), then count it and call its callback back."""
    msg = TrialMessage.model_validate(message)
    ending = abandon_run(msg.trial_id, runtime(), reason)
    if ending is not None:
        announce_end(msg.trial_id, ending, msg.spec.get("callback_url"), runtime())


def abandon_study_step(message: dict, reason: str) -> None:
    """End a given-up step's trial as ``error`` and carry the study on (:func:`workers.study.step.abandon_step`)."""
    msg = StudyStepMessage.model_validate(message)
    abandon_step(msg.study_id, msg.slot, runtime(), send_step, reason)


def abandon_range_test(message: dict, reason: str) -> None:
    """End a given-up range test as ``error`` (unless another worker holds it)."""
    abandon_run(RangeTestMessage.model_validate(message).run_id, runtime(), reason)


def send_step(study_id: str, slot: int, route: Route) -> None:
    share().send(StudyStepMessage(study_id=study_id, slot=slot), route)


@app.task(name=TASK_RUN_TRIAL, **task_options(settings, abandon_trial))
def trial_task(self, message: dict) -> str:
    """Train one trial; its outcome is recorded in its MLflow run, and returned."""
    msg = TrialMessage.model_validate(message)
    with log_context(trial_id=msg.trial_id, study_id=(msg.spec.get("tags") or {}).get(TAG.STUDY_ID)):
        try:
            ending = execute_trial(msg.trial_id, msg.spec, runtime())
        except LeaseHeld as held:
            # Another worker is training it (a duplicate delivery): look again once its lease could lapse.
            log.info("trial %s: %s; checking again in %ss", msg.trial_id, held, held.retry_in_s)
            raise self.check_again(held.retry_in_s) from held
        except Superseded:
            return "superseded"
        if ending is None:
            return "skipped"
        announce_end(msg.trial_id, ending, msg.spec.get("callback_url"), runtime())
        return ending.outcome


@app.task(name=TASK_STUDY_STEP, **task_options(settings, abandon_study_step))
def study_step_task(self, message: dict) -> str:
    """Run one trial of a study, then send the study's next steps (see :mod:`workers.study.step`)."""
    msg = StudyStepMessage.model_validate(message)
    with log_context(study_id=msg.study_id):
        try:
            return execute_step(msg.study_id, msg.slot, runtime(), send_step)
        except LeaseHeld as held:
            log.info("study %s: %s; checking again in %ss", msg.study_id, held, held.retry_in_s)
            raise self.check_again(held.retry_in_s) from held


@app.task(name=TASK_LR_FIND, **task_options(settings, abandon_range_test))
def lr_find_task(self, message: dict) -> str:
    """Run one learning-rate range test; its result is recorded in its MLflow run (see :mod:`workers.trial.lr_finder`)."""
    msg = RangeTestMessage.model_validate(message)
    with log_context(trial_id=msg.run_id):
        try:
            return execute_lr_find(msg.run_id, msg.spec, runtime())
        except LeaseHeld as held:
            # A dead process's lease, still alive, or a live duplicate: look again once it could lapse.
            log.info("range test %s: %s; checking again in %ss", msg.run_id, held, held.retry_in_s)
            raise self.check_again(held.retry_in_s) from held
        except Superseded:
            return "superseded"
