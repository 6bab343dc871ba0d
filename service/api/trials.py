"""/trials: submit a training run, follow it, list them, cancel one."""

from __future__ import annotations

from flask import url_for
from flask_openapi3 import APIBlueprint, Tag

from models.logs import bind
from models.store.runs import TAG
from models.spec.trial import TrialSpec
from service.api.auth import check_owner, current_principal
from service.api.callbacks import notify_ended_by_api
from service.api.errors import Conflict, Problem
from service.api.idempotency import IdempotencyHeader, idempotent
from service.api.limits import check_queued_quota
from service.api.runs import TrialRecord
from service.api.schemas import BestMetric, TrialAccepted, TrialList, TrialListQuery, TrialPath, TrialPublic
from service.api.wiring import services

__all__ = ["bp", "trial_public"]

bp = APIBlueprint("trials", __name__, url_prefix="/trials", abp_tags=[Tag(name="trials")])
PROBLEMS = {400: Problem, 413: Problem, 415: Problem, 422: Problem, 503: Problem}


@bp.post("", responses={202: TrialAccepted, 409: Problem, **PROBLEMS})
@idempotent
def create_trial(body: TrialSpec, header: IdempotencyHeader):
    """Submit a trial: validated, sized, recorded in MLflow, then queued for a worker."""
    s = services()
    owner = current_principal().name
    check_queued_quota(s.runs.count_queued(owner, s.settings.max_queued_trials_per_token), s.settings)
    accepted = s.dispatcher.accept(body, extra_tags={TAG.OWNER: owner})
    bind(trial_id=accepted.trial_id)
    url = url_for("trials.get_trial", trial_id=accepted.trial_id, _external=True)
    answer = TrialAccepted(
        id=accepted.trial_id, status="queued", name=body.display_name(), queue=accepted.queue, url=url,
        mlflow_url=s.runs.run_url(accepted.trial_id, s.settings.ui_url),
        params_count=accepted.plan.params if accepted.plan else None,
        flops_per_sample=accepted.plan.flops if accepted.plan else None,
    )
    return answer.model_dump(), 202, {"Location": url}


@bp.get("", responses={200: TrialList, 400: Problem, 503: Problem})
def list_trials(query: TrialListQuery):
    """List trials, newest first, a page at a time, optionally of one status."""
    s = services()
    records, token = s.runs.search(status=query.status, max_results=query.limit, page_token=query.page_token)
    return TrialList(items=[trial_public(r, with_history=False) for r in records], next_page_token=token or None).model_dump()


@bp.get("/<trial_id>", responses={200: TrialPublic, 404: Problem, 503: Problem})
def get_trial(path: TrialPath):
    """Show a trial: status, outcome and reason, latest and best metrics, timings."""
    return trial_public(services().runs.get(path.trial_id)).model_dump()


@bp.post("/<trial_id>/cancel", responses={202: TrialPublic, 404: Problem, 409: Problem, 503: Problem})
def cancel_trial(path: TrialPath):
    """Cancel a queued or running trial; a running one stops at its next check (within N steps)."""
    s = services()
    record = s.runs.get(path.trial_id)
    check_owner(record.tags.get(TAG.OWNER), f"trial {record.id}")
    if record.terminal:
        raise Conflict(f"trial {record.id} has already ended ({record.status}); there is nothing to cancel")
    was_queued = record.mlflow_status == "SCHEDULED"
    s.dispatcher.request_cancel(record.id, was_queued=was_queued)
    ended = s.runs.get(record.id)
    if was_queued:  # no worker will run it, so no worker will call its callback back
        notify_ended_by_api(ended)
    return trial_public(ended).model_dump(), 202


def trial_public(record: TrialRecord, with_history: bool = True) -> TrialPublic:
    """A trial record as the API shows it; ``with_history`` reads the best epochs (one more MLflow call each)."""
    s = services()
    spec = record.spec or {}
    best: dict[str, BestMetric] = {}
    if with_history:
        for key, better in (("val_accuracy", max), ("val_loss", min)):
            history = s.runs.metric_history(record.id, key) if key in record.metrics else []
            if history:
                epoch, value = better(history, key=lambda sv: sv[1])
                best[key] = BestMetric(value=value, epoch=epoch)
    tags = record.tags
    return TrialPublic(
        id=record.id, name=tags.get(TAG.RUN_NAME), status=record.status, outcome=record.outcome,
        reason=tags.get(TAG.REASON), queue=tags.get(TAG.QUEUE), epochs_done=int(tags.get(TAG.EPOCHS_DONE, 0)),
        epochs=spec.get("optim", {}).get("epochs"), metrics=record.metrics, best=best,
        params_count=_int(tags.get(TAG.PARAMS_COUNT)), flops_per_sample=_int(tags.get(TAG.FLOPS)),
        timings=record.timings(), spec=spec or None, mlflow_url=s.runs.run_url(record, s.settings.ui_url),
    )


def _int(value: str | None) -> int | None:
    return int(value) if value else None

