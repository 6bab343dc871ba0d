"""/usage: the compute a team used, from the usage table the workers write as runs end.

A team's token sees its own team's totals; an admin or read-all token sees every team's. Totals are
by team and device kind, over the runs that ended in ``[since, until)`` (default: the last 24 hours):
device-seconds (wall time of training times its devices), CPU seconds, training FLOPs and runs
(trials, range tests, study trials; a study's own run adds nothing: its trials carry its use).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from models.store.usage import DAY_S, open_usage
from service.api.auth import current_principal
from service.api.errors import BadRequest, FieldError, ServiceUnavailable
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.wiring import services

__all__ = ["UsageQuery", "UsageReport", "bp", "parse_time"]

bp = APIBlueprint("usage", __name__, url_prefix="/usage", abp_tags=[Tag(name="usage")], abp_security=BEARER, abp_responses=PROTECTED_ERRORS)


class UsageQuery(BaseModel):
    since: str | None = Field(default=None, description="Start of the span (ISO 8601, or Unix seconds); default 24 hours before 'until'.")
    until: str | None = Field(default=None, description="End of the span, excluded (ISO 8601, or Unix seconds); default now.")


class UsageRow(BaseModel):
    """One team's use on one kind of device."""

    team: str | None = Field(description="The team (null: work submitted with authentication off).")
    device_kind: str = Field(description="'cpu', the CUDA device's name, or 'none' for runs that ended before training.")
    device_seconds: float = Field(description="Wall time of training on its devices, times the number of devices.")
    cpu_seconds: float = Field(description="CPU time of the training process(es).")
    flops: float = Field(description="Training FLOPs: forward FLOPs per sample x samples trained on x 3.")
    runs: int = Field(description="Runs that ended in the span (trials, range tests, study trials).")


class UsageReport(BaseModel):
    """What the caller may see of the compute used in ``[since, until)``."""

    since: str
    until: str
    teams: list[str | None] = Field(description="The teams shown: the caller's own, or every team with use for an admin or read-all token.")
    items: list[UsageRow]
    total: UsageRow | None = Field(description="The sum of the items (team and device_kind: null and 'all'); null when there are none.")


def parse_time(value: str | None, field: str, default: float) -> float:
    """Unix seconds of ``value`` (ISO 8601, a naive time read as UTC, or Unix seconds); BadRequest naming ``field`` otherwise."""
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        message = f"{value!r} is neither an ISO 8601 time nor Unix seconds"
        raise BadRequest(f"{field}: {message}", errors=[FieldError(field=field, message=message)]) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


@bp.get("", responses={200: UsageReport, **problems(400, 503)})
def get_usage(query: UsageQuery):
    """Show the compute used by this token's team (every team's for admin and read-all), by team and device kind."""
    s, principal = services(), current_principal()
    until = parse_time(query.until, "until", time.time())
    since = parse_time(query.since, "since", until - DAY_S)
    if since >= until:
        raise BadRequest("since must be before until", errors=[FieldError(field="since", message="must be before until")])
    try:
        totals = open_usage(s.settings.study_storage).totals(since, until, principal.team, every_team=principal.sees_all)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"the usage table did not answer: {str(exc)[:300]}") from exc
    items = [UsageRow(team=t.team, device_kind=t.device_kind, device_seconds=t.device_seconds, cpu_seconds=t.cpu_seconds, flops=t.flops, runs=t.runs) for t in totals]
    total = None
    if items:
        total = UsageRow(
            team=None, device_kind="all", device_seconds=sum(i.device_seconds for i in items), cpu_seconds=sum(i.cpu_seconds for i in items),
            flops=sum(i.flops for i in items), runs=sum(i.runs for i in items),
        )
    teams = sorted({i.team for i in items}, key=lambda t: t or "") if principal.sees_all else [principal.team]
    return UsageReport(since=_iso(since), until=_iso(until), teams=teams, items=items, total=total).model_dump()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()
