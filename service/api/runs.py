"""MLflow as the system of record: trials are runs, their state is the run's status and tags.

The API talks to MLflow only through :class:`RunStore`, which translates MLflow's errors where they
enter: a run that does not exist is :class:`~service.api.errors.NotFound`, anything else (the server
down, a timeout) is :class:`~service.api.errors.ServiceUnavailable`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from models.store import runs
from models.store.runs import EXPERIMENT_KIND, KIND, TAG, TERMINAL_STATUSES, client_status
from service.api.errors import BadRequest, NotFound, ServiceUnavailable

__all__ = ["RUN_ID", "RunRecord", "RunStore"]

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Client-side status filter -> MLflow search filter.
STATUS_FILTERS = {
    "queued": "attributes.status = 'SCHEDULED'",
    "running": "attributes.status = 'RUNNING'",
    "succeeded": f"tags.`{TAG.OUTCOME}` = 'succeeded'",
    "pruned": f"tags.`{TAG.OUTCOME}` = 'pruned'",
    "failed": "attributes.status = 'FAILED'",
    "cancelled": "attributes.status = 'KILLED'",
}


def _iso(ms: int | None) -> str | None:
    return None if not ms else datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


@dataclass
class RunRecord:
    """What the API reads back from one MLflow run (a trial's, a study's parent, a range test's)."""

    id: str
    experiment_id: str
    mlflow_status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    start_ms: int | None
    end_ms: int | None

    @classmethod
    def from_run(cls, run: Any, **extra: Any) -> Any:
        """The record of an MLflow ``Run``; ``extra`` fills a subclass's own fields."""
        return cls(
            id=run.info.run_id, experiment_id=run.info.experiment_id, mlflow_status=run.info.status,
            tags=dict(run.data.tags), metrics=dict(run.data.metrics), start_ms=run.info.start_time, end_ms=run.info.end_time, **extra,
        )

    @property
    def terminal(self) -> bool:
        return self.mlflow_status in TERMINAL_STATUSES

    @property
    def outcome(self) -> str | None:
        return self.tags.get(TAG.OUTCOME)

    @property
    def status(self) -> str:
        """The client-facing status (``queued`` ... ``failed``)."""
        return client_status(self.mlflow_status, self.outcome)

    @property
    def submitted_spec(self) -> dict[str, Any] | None:
        """The spec as submitted (JSON), from its tag; a study record holds its validated StudySpec as ``spec``."""
        raw = self.tags.get(TAG.SPEC)
        return json.loads(raw) if raw else None

    def timings(self) -> dict[str, Any]:
        started = self.tags.get(TAG.STARTED_AT)
        created, ended = _iso(self.start_ms), _iso(self.end_ms)
        duration = None
        if self.end_ms and started:
            duration = round(self.end_ms / 1000 - datetime.fromisoformat(started).timestamp(), 3)
        return {"created_at": created, "started_at": started, "ended_at": ended, "run_seconds": duration}


class RunStore:
    """Create, read and end convtune's MLflow runs."""

    def __init__(self, tracking_uri: str, experiment: str):
        # Fail fast instead of MLflow's default minutes of retries: the API answers 503 instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient  # ~2 s: paid once per API process

        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self._experiment_id: str | None = None

    @contextmanager
    def translated(self, run_id: str | None = None, what: str = "trial") -> Iterator[None]:
        """Translate MLflow's errors inside the block: NotFound ("no {what} with id ...") or ServiceUnavailable."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            if run_id and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise NotFound(f"no {what} with id {run_id!r}") from exc
            if exc.error_code == "INVALID_PARAMETER_VALUE" and "page token" in str(exc).lower():
                raise BadRequest("page_token is not one this service gave out; start again without it") from exc
            raise ServiceUnavailable(f"the tracking server (MLflow) did not answer: {_short(exc)}") from exc
        except OSError as exc:
            raise ServiceUnavailable(f"the tracking server (MLflow) is unreachable: {_short(exc)}") from exc

    def experiment_id(self) -> str:
        """The id of convtune's experiment, created (tagged for the training UI) on first use."""
        if self._experiment_id is None:
            with self.translated():
                found = self.client.get_experiment_by_name(self.experiment)
                if found is not None:
                    self._experiment_id = found.experiment_id
                else:
                    self._experiment_id = self._create_experiment()
        return self._experiment_id

    def _create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(self.experiment, tags={TAG.EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:  # another API process created it first
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def ping(self) -> None:
        """Raise ServiceUnavailable unless MLflow answers."""
        with self.translated():
            self.client.search_experiments(max_results=1)

    def create(self, name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        """Create a SCHEDULED run (its kind among ``tags``), params logged once, here (models.store.runs)."""
        with self.translated():
            return runs.create_run(self.client, self.experiment_id(), name=name, tags=tags, params=params)

    def get_run(self, run_id: str, kind: str, what: str) -> RunRecord:
        """The run ``run_id`` of ``kind``; NotFound ("no {what} with id ...") otherwise."""
        if not RUN_ID.match(run_id):
            raise NotFound(f"no {what} with id {run_id!r}")
        with self.translated(run_id, what):
            run = self.client.get_run(run_id)
        if run.data.tags.get(TAG.KIND) != kind:
            raise NotFound(f"no {what} with id {run_id!r}")
        return RunRecord.from_run(run)

    def get(self, run_id: str) -> RunRecord:
        """The trial ``run_id``; NotFound when it is not a convtune trial."""
        return self.get_run(run_id, KIND.TRIAL, "trial")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        with self.translated(run_id):
            return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def search(self, *, status: str | None, max_results: int, page_token: str | None) -> tuple[list[RunRecord], str | None]:
        """Trials newest first, optionally of one status; returns the page and the next page's token."""
        from mlflow.entities import ViewType

        filters = [f"tags.`{TAG.KIND}` = 'trial'"]
        if status:
            filters.append(STATUS_FILTERS[status])
        with self.translated():
            page = self.client.search_runs(
                [self.experiment_id()], filter_string=" and ".join(filters), run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results, order_by=["attributes.start_time DESC"], page_token=page_token,
            )
        return [RunRecord.from_run(run) for run in page], page.token

    def queued_runs(self, owner: str, cap: int) -> tuple[int, list[str]]:
        """How much work ``owner`` (an API token's name) has queued (trials, studies, range tests), counted up to ``cap``, and their ids."""
        filters = f"tags.`{TAG.OWNER}` = '{owner}' and attributes.status = 'SCHEDULED'"
        with self.translated():
            # MLflow returns at most 50,000 runs a page: a cap above that is never reached.
            found = self.client.search_runs([self.experiment_id()], filter_string=filters, max_results=min(cap, 50_000))
        return len(found), [r.info.run_id for r in found]

    def end(self, run_id: str, status: str, outcome: str, reason: str) -> None:
        """End a run that no worker is running (failed at accept, cancelled while queued)."""
        with self.translated(run_id):
            runs.end_run(self.client, run_id, status, outcome, reason)

    def end_undispatched(self, run_id: str, detail: str) -> None:
        """End a run whose work was not sent (failed, ``not dispatched: detail``); never raises.

        Should MLflow fail too, the run stays SCHEDULED with nothing sent: logged here, for the
        reconciler to end. The client hears its 503 either way.
        """
        try:
            self.end(run_id, "FAILED", "error", f"not dispatched: {detail}")
        except ServiceUnavailable as exc:
            log.error("run %s was not dispatched and could not be marked failed (%s); the reconciler will end it", run_id, exc.detail)

    def run_url(self, record_or_id: RunRecord | str, ui_url: str) -> str:
        """The MLflow UI page of a run (the experiment's training view, not its GenAI overview)."""
        run_id = record_or_id if isinstance(record_or_id, str) else record_or_id.id
        return f"{ui_url}/#/experiments/{self.experiment_id()}/runs/{run_id}"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:limit]

