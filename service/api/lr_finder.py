"""/lr-finder: run a learning-rate range test of a trial spec, and read its suggestion.

A range test is its own MLflow run (tag ``convtune.kind = lr_finder``), accepted like a trial: the
spec is validated and sized, the run created SCHEDULED, then a ``convtune.lr_find`` message sent
to the trial's queue (503, and the run failed, when the broker does not take it). A worker runs
the test (:mod:`workers.trial.lr_finder`) and records the curve and the two learning rates; the rules
that pick them are in :mod:`models.spec.tuning` and docs/tuning.md.
"""

from __future__ import annotations

from typing import Any

from flask import url_for
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from models.logs import bind
from models.messages import RangeTestMessage
from models.spec.trial import flatten_params
from models.spec.tuning import LrRangeSpec
from models.store.runs import KIND, TAG, spec_tags
from models.store.share import Route
from service.api.accept import accept_run
from service.api.admission import admit_trial, served_queue
from service.api.auth import check_owner, current_principal, redacted
from service.api.errors import Conflict
from service.api.idempotency import IdempotencyHeader, idempotent
from service.api.limits import check_queued_quota
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.quotas import check_compute_quota
from service.api.runs import RunRecord
from service.api.schemas import Status
from service.api.trials import request_cancel
from service.api.wiring import services

__all__ = ["LrFinderAccepted", "LrFinderPublic", "bp"]

bp = APIBlueprint(
    "lr_finder", __name__, url_prefix="/lr-finder", abp_tags=[Tag(name="lr-finder")], abp_security=BEARER, abp_responses=PROTECTED_ERRORS,
)
WHAT = "LR range test"


class LrFinderPath(BaseModel):
    test_id: str = Field(description="The range test's id, which is its MLflow run id.")


class LrFinderQuery(BaseModel):
    curve: bool = Field(default=True, description="Include the recorded curve (LR, loss and smoothed loss per step).")


class LrFinderAccepted(BaseModel):
    """The answer to an accepted range test (202): where to follow it."""

    id: str
    status: Status
    name: str
    queue: str
    url: str = Field(description="This range test in the API.")
    mlflow_url: str


class LrCurve(BaseModel):
    step: list[int]
    lr: list[float]
    loss: list[float | None]
    smoothed_loss: list[float | None] = Field(description="The moving average that decides the early stop.")


class LrFinderPublic(BaseModel):
    """A range test as a client sees it; the LRs are null until it succeeds."""

    id: str
    name: str | None
    status: Status
    outcome: str | None
    reason: str | None = Field(description="How it ended: the two LRs and why the test stopped, or why it failed.")
    queue: str | None
    steps: int | None = Field(description="Steps planned.")
    steps_done: int
    suggested_lr: float | None = Field(description="Largest stable LR / 3 (docs/tuning.md).")
    largest_stable_lr: float | None = Field(description="The LR at the minimum of the centred-average loss.")
    search_range: tuple[float, float] | None = Field(description="The LR range a study centred on this result searches (models.spec.tuning.lr_search_range).")
    curve: LrCurve | None
    spec: dict[str, Any] | None
    timings: dict[str, Any]
    mlflow_url: str


@bp.post("", responses={202: LrFinderAccepted, **problems(400, 409, 413, 415, 503)})
@idempotent
def create_range_test(body: LrRangeSpec, header: IdempotencyHeader):
    """Submit a learning-rate range test of a trial spec; its URL gives the suggested and largest stable LR."""
    s = services()
    principal = current_principal()
    plan = admit_trial(body.trial, s.settings, principal.team, field_prefix="trial.")
    queue = served_queue(s.redis, body.trial.queue, s.settings, "trial.queue")
    check_queued_quota(s.runs, s.redis, principal, s.settings)
    # A range test trains body.steps batches at most: estimated as a trial of one epoch, bounded by its time limit like one.
    reservation = check_compute_quota(s, principal, "lr_finder", queue, body.trial.model_copy(update={"optim": body.trial.optim.model_copy(update={"epochs": 1})}), plan)
    o = body.trial.optim
    name = body.trial.name or f"lr range test {body.start_lr:g}..{body.end_lr:g} bs={o.batch_size} {o.optimizer} k{body.trial.model.kernel_size}"
    params = {**flatten_params(body.trial), **{f"lr_finder.{k}": str(v) for k, v in body.model_dump(exclude={"trial"}).items()}}
    tags = {
        TAG.KIND: KIND.LR_FINDER, **spec_tags(body.model_dump(mode="json"), s.settings.sealer()), TAG.QUEUE: queue, TAG.PRIORITY: body.trial.priority,
        **{f"user.{k}": v for k, v in body.trial.tags.items()},
    }

    def send(test_id: str) -> None:
        s.send(RangeTestMessage(run_id=test_id, spec=body.model_dump(mode="json")), Route(queue, principal.team, body.trial.priority))

    test_id = accept_run(s, principal, WHAT, name, tags, params, send, reservation)
    bind(trial_id=test_id)
    url = url_for("lr_finder.get_range_test", test_id=test_id, _external=True)
    answer = LrFinderAccepted(id=test_id, status="queued", name=name, queue=queue, url=url, mlflow_url=s.runs.run_url(s.settings.ui_url, s.runs.experiment_id(principal.team), test_id))
    return answer.model_dump(), 202, {"Location": url}


@bp.get("/<test_id>", responses={200: LrFinderPublic, **problems(404, 503)})
def get_range_test(path: LrFinderPath, query: LrFinderQuery):
    """Show a range test: status, the suggested and largest stable LR, the curve."""
    s = services()
    return range_test_public(s.runs.get_run(path.test_id, KIND.LR_FINDER, WHAT), with_curve=query.curve).model_dump()


@bp.post("/<test_id>/cancel", responses={202: LrFinderPublic, **problems(404, 409, 503)})
def cancel_range_test(path: LrFinderPath):
    """Cancel a range test: a queued or orphaned one ends now, a running one stops within N steps."""
    s = services()
    record = s.runs.get_run(path.test_id, KIND.LR_FINDER, WHAT)
    check_owner(record.tags, f"{WHAT} {record.id}")
    if record.terminal:
        raise Conflict(f"{WHAT} {record.id} has already ended ({record.status}); there is nothing to cancel")
    request_cancel(s, record)
    return range_test_public(s.runs.get_run(record.id, KIND.LR_FINDER, WHAT), with_curve=False).model_dump(), 202


def range_test_public(record: RunRecord, with_curve: bool = True) -> LrFinderPublic:
    """A range test's run as the API shows it; the curve costs three MLflow calls."""
    from models.spec.tuning import lr_search_range

    s = services()
    spec = record.submitted_spec or {}
    suggested, largest = _float(record.tags.get(TAG.SUGGESTED_LR)), _float(record.tags.get(TAG.LARGEST_STABLE_LR))
    search = lr_search_range(suggested, largest) if suggested is not None and largest is not None else None
    curve = None
    if with_curve and "lr_finder.lr" in record.metrics:
        series = {key: dict(s.runs.metric_history(record.id, f"lr_finder.{key}")) for key in ("lr", "loss", "smoothed_loss")}
        steps = sorted(series["lr"])
        curve = LrCurve(
            step=steps, lr=[series["lr"][i] for i in steps],
            loss=[_finite(series["loss"].get(i)) for i in steps], smoothed_loss=[_finite(series["smoothed_loss"].get(i)) for i in steps],
        )
    return LrFinderPublic(
        id=record.id, name=record.tags.get(TAG.RUN_NAME), status=record.status, outcome=record.outcome, reason=record.tags.get(TAG.REASON),
        queue=record.tags.get(TAG.QUEUE), steps=spec.get("steps"), steps_done=int(record.tags.get(TAG.STEPS_DONE, 0)),
        suggested_lr=suggested, largest_stable_lr=largest, search_range=search, curve=curve, spec=redacted(spec, record.tags, s.settings.sealer()) or None,
        timings=record.timings(), mlflow_url=s.runs.run_url(s.settings.ui_url, record.experiment_id, record.id),
    )


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _finite(value: float | None) -> float | None:
    import math

    return value if value is not None and math.isfinite(value) else None
