"""A trial's or range test's own log lines, as the worker recorded them in its run (``logs/trial.log``).

    GET /trials/{id}/logs       text/plain: every attempt's log, oldest first
    GET /lr-finder/{id}/logs

The worker writes the artifact as the trial goes and once more at its end (a later attempt, after its
worker died, as ``logs/trial.attempt-N.log``). The API reads them from MLflow with the run's owner
rules: another team's run is a 404 worded as an unknown id. A run with no log yet (queued, or written
by a worker that kept none) answers an empty body.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from flask import Response
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from models.store.runs import KIND
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.wiring import services

__all__ = ["bp", "run_logs"]

bp = APIBlueprint("logs", __name__, abp_tags=[Tag(name="logs")], abp_security=BEARER, abp_responses=PROTECTED_ERRORS)
_LOG_DIR = "logs"
_ATTEMPT = re.compile(r"^trial(?:\.attempt-(\d+))?\.log$")
_MAX_BYTES = 8 * 1024 * 1024  # every attempt's together: the worker keeps each under a few MB


class TrialLogsPath(BaseModel):
    trial_id: str = Field(description="The trial's id.")


class RangeTestLogsPath(BaseModel):
    test_id: str = Field(description="The range test's id.")


@bp.get("/trials/<trial_id>/logs", responses={200: None, **problems(404, 503)})
def get_trial_logs(path: TrialLogsPath):
    """A trial's own log lines (warnings, errors, a failure's traceback), each attempt's in turn, as text."""
    return run_logs(path.trial_id, KIND.TRIAL, "trial")


@bp.get("/lr-finder/<test_id>/logs", responses={200: None, **problems(404, 503)})
def get_range_test_logs(path: RangeTestLogsPath):
    """A range test's own log lines, as text."""
    return run_logs(path.test_id, KIND.LR_FINDER, "LR range test")


def run_logs(run_id: str, kind: str, what: str) -> Response:
    """The text of ``run_id``'s log artifacts (a 404 for a run the caller may not read, or of another kind)."""
    runs = services().runs
    runs.get_run(run_id, kind, what)  # its owner rules
    with runs.translated(run_id, what):
        found = [f.path for f in runs.client.list_artifacts(run_id, _LOG_DIR) if not f.is_dir]
        attempts = sorted((int(m.group(1) or 1), path) for path in found if (m := _ATTEMPT.match(Path(path).name)))
        parts = []
        with tempfile.TemporaryDirectory() as tmp:
            for attempt, path in attempts:
                text = Path(runs.client.download_artifacts(run_id, path, tmp)).read_text(errors="replace")
                parts.append(text if len(attempts) == 1 else f"--- attempt {attempt} ---\n{text}")
    body = "\n".join(parts)
    if len(body) > _MAX_BYTES:
        body = body[-_MAX_BYTES:]
    return Response(body, mimetype="text/plain")
