"""/trials: submit a training run, follow it, list them, cancel one.

Accepting is the contract of ARCHITECTURE.md, decision 2, in this order: check the spec (admission), create
its MLflow run SCHEDULED with params and tags (the trial's id is the run's id), then send its
message. A message the broker does not take ends the run as failed before the client hears 503:
nothing is half-accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from flask import url_for
from flask_openapi3 import APIBlueprint, Tag

from models.logs import bind
from models.messages import TrialMessage
from models.spec.plan import NetworkPlan
from models.spec.trial import TrialSpec, flatten_params
from models.store.keys import cancel_key, lease_key
from models.store.runs import TAG, trial_tags
from models.store.share import Route
from service.api.accept import accept_run
from service.api.admission import admit_trial, served_queue
from service.api.auth import Principal, check_owner, current_principal, redacted
from service.api.callbacks import notify_ended_by_api
from service.api.errors import Conflict, ServiceUnavailable
from service.api.idempotency import IdempotencyHeader, idempotent
from service.api.limits import check_queued_quota
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.quotas import check_compute_quota
from service.api.runs import RunRecord
from service.api.schemas import BestMetric, TrialAccepted, TrialList, TrialListQuery, TrialPath, TrialPublic
from service.api.wiring import Services, services

__all__ = ["Accepted", "accept_trial", "bp", "request_cancel", "trial_public"]

log = logging.getLogger(__name__)

bp = APIBlueprint(
    "trials", __name__, url_prefix="/trials", abp_tags=[Tag(name="trials")], abp_security=BEARER, abp_responses=PROTECTED_ERRORS,
)


@bp.post("", responses={202: TrialAccepted, **problems(400, 409, 413, 415, 503)})
@idempotent
def create_trial(body: TrialSpec, header: IdempotencyHeader):
    """Submit a trial: validated, sized, recorded in MLflow, then queued for a worker."""
    s = services()
    principal = current_principal()
    accepted = accept_trial(s, body, principal)
    bind(trial_id=accepted.trial_id)
    url = url_for("trials.get_trial", trial_id=accepted.trial_id, _external=True)
    answer = TrialAccepted(
        id=accepted.trial_id, status="queued", name=body.display_name(), queue=accepted.queue, url=url,
        mlflow_url=s.runs.run_url(s.settings.ui_url, s.runs.experiment_id(principal.team), accepted.trial_id),
        params_count=accepted.plan.params if accepted.plan else None,
        flops_per_sample=accepted.plan.flops if accepted.plan else None,
    )
    return answer.model_dump(), 202, {"Location": url}


@bp.get("", responses={200: TrialList, **problems(400, 503)})
def list_trials(query: TrialListQuery):
    """List the trials this token's team may read, newest first, a page at a time; filter by status, study, team, owner, tag and time."""
    s = services()
    records, token = s.runs.search(
        current_principal(), status=query.status, max_results=query.limit, page_token=query.page_token, filters=query, study=query.study,
    )
    return TrialList(items=[trial_public(r, with_history=False) for r in records], next_page_token=token or None).model_dump()


@bp.get("/<trial_id>", responses={200: TrialPublic, **problems(404, 503)})
def get_trial(path: TrialPath):
    """Show a trial: status, outcome and reason, latest and best metrics, timings."""
    return trial_public(services().runs.get(path.trial_id)).model_dump()


@bp.post("/<trial_id>/cancel", responses={202: TrialPublic, **problems(404, 409, 503)})
def cancel_trial(path: TrialPath):
    """Cancel a trial: a queued or orphaned one ends now, a running one stops at its next check (within N steps)."""
    s = services()
    record = s.runs.get(path.trial_id)
    check_owner(record.tags, f"trial {record.id}")
    if record.terminal:
        raise Conflict(f"trial {record.id} has already ended ({record.status}); there is nothing to cancel")
    ended_here = request_cancel(s, record)
    ended = s.runs.get(record.id)
    if ended_here:  # no worker runs it, so no worker will call its callback back
        notify_ended_by_api(ended)
    return trial_public(ended).model_dump(), 202


@dataclass
class Accepted:
    trial_id: str
    queue: str
    plan: NetworkPlan | None


def accept_trial(s: Services, spec: TrialSpec, principal: Principal) -> Accepted:
    """Check, then record and send (:func:`service.api.accept.accept_run`: a message not sent ends the run failed and raises 503)."""
    plan = admit_trial(spec, s.settings, principal.team)
    queue = served_queue(s.redis, spec.queue, s.settings, "queue")
    check_queued_quota(s.runs, s.redis, principal, s.settings)
    reservation = check_compute_quota(s, principal, "trial", queue, spec, plan)

    def send(trial_id: str) -> None:
        s.send(TrialMessage(trial_id=trial_id, spec=spec.model_dump(mode="json")), Route(queue, principal.team, spec.priority))

    tags = trial_tags(spec, plan, queue, s.settings.sealer())
    trial_id = accept_run(s, principal, "trial", spec.display_name(), tags, flatten_params(spec), send, reservation)
    log.info("trial %s accepted on queue %s", trial_id, queue)
    return Accepted(trial_id, queue, plan)


def request_cancel(s: Services, record: RunRecord) -> bool:
    """Raise the cancel flag the training loop checks, and end the run now unless a worker holds it; whether it ended it.

    A queued run, and a running one whose lease no worker renews (its worker was lost), end
    ``cancelled`` here: no training loop would see the flag. A worker that receives the run's
    message later sees it ended and skips it; one that wakes up without its lease writes nothing.
    """
    try:
        s.redis.set(cancel_key(record.id), "1", ex=s.settings.visibility_timeout_s * 2)
        held = record.mlflow_status == "RUNNING" and bool(s.redis.exists(lease_key(record.id)))
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
    if held:
        return False
    reason = "cancelled on request before it started" if record.mlflow_status == "SCHEDULED" else "cancelled on request; no worker held it"
    s.runs.end(record.id, "KILLED", "cancelled", reason)
    return True


def trial_public(record: RunRecord, with_history: bool = True) -> TrialPublic:
    """A trial record as the API shows it; ``with_history`` reads the best epochs (one more MLflow call each)."""
    s = services()
    spec = record.submitted_spec or {}
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
        timings=record.timings(), spec=redacted(spec, tags, s.settings.sealer()) or None, mlflow_url=s.runs.run_url(s.settings.ui_url, record.experiment_id, record.id),
        model_uri=record.model_uri,
    )


def _int(value: str | None) -> int | None:
    return int(value) if value else None

