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
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from models.store import runs
from models.store.access import AccessNotGranted, TeamAccess
from models.store.claims import open_claims
from models.store.runs import EXPERIMENT_KIND, KIND, TAG, TERMINAL_STATUSES, client_status
from models.store.search import storage_kind
from models.store.teams import experiment_ids, experiment_name
from models.store.usage import open_usage
from service.api.auth import Principal, check_visible
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


# A study's state, as far as its parent run's MLflow status tells (a cancelling study is RUNNING).
STUDY_STATUS_FILTERS = {
    "queued": "attributes.status = 'SCHEDULED'",
    "running": "attributes.status = 'RUNNING'",
    "succeeded": "attributes.status = 'FINISHED'",
    "failed": "attributes.status = 'FAILED'",
    "cancelled": "attributes.status = 'KILLED'",
}


def filter_string(filters: Any) -> str:
    """The MLflow filter clauses (each `` and ...``) of a list's filters (:class:`service.api.schemas.ListFilters`).

    Every value was checked against a pattern without quotes, so none can end the filter's string.
    """
    if filters is None:
        return ""
    clauses = []
    if filters.team:
        clauses.append(f"tags.`{TAG.TEAM}` = '{filters.team}'")
    if filters.owner:
        clauses.append(f"tags.`{TAG.OWNER}` = '{filters.owner}'")
    if filters.tag:
        key, _, value = filters.tag.partition("=")
        clauses.append(f"tags.`user.{key}` = '{value}'")
    if filters.since:
        clauses.append(f"attributes.start_time >= {int(filters.since.timestamp() * 1000)}")
    if filters.until:
        clauses.append(f"attributes.start_time < {int(filters.until.timestamp() * 1000)}")
    return "".join(f" and {clause}" for clause in clauses)


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
    def model_uri(self) -> str | None:
        """A trial's MLflow logged model (``models:/<id>``, its tag set with its ending); None while it has none."""
        model_id = self.tags.get(TAG.MODEL_ID)
        return f"models:/{model_id}" if model_id else None

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

    def __init__(self, tracking_uri: str, experiment: str, study_storage: str, access: TeamAccess | None = None):
        # Fail fast instead of MLflow's default minutes of retries: the API answers 503 instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient  # a slow import (docs/performance.md): paid once per API process

        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.study_storage = study_storage  # where the service records each team's experiment (models.store.claims)
        self._experiment_ids: dict[str | None, str] = {}
        self.access = access  # with MLflow's basic-auth: each team's people read its experiment (models.store.access)
        self._team_reads: set[str] = set()  # teams granted READ on their experiment by this process

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

    def experiment_id(self, team: str | None) -> str:
        """The id of ``team``'s experiment (:mod:`models.store.teams`), created and recorded on first use."""
        if team not in self._experiment_ids:
            if team is None:  # no teams (auth off): the one experiment, by its name, as always
                with self.translated():
                    found = self.client.get_experiment_by_name(self.experiment)
                    self._experiment_ids[None] = found.experiment_id if found is not None else self._create_experiment(self.experiment, None)
            else:
                self._experiment_ids[team] = self._recorded_experiment(team) or self._create_team_experiment(team)
        if team is not None and self.access is not None and team not in self._team_reads:
            self._let_team_read(team, self._experiment_ids[team])
        return self._experiment_ids[team]

    def _let_team_read(self, team: str, experiment_id: str) -> None:
        """Grant ``team``'s MLflow role READ on its experiment, once per process (idempotent: also repairs a grant an earlier
        process could not make). Best-effort: a refusal is logged and retried at the next use; the run is created either way."""
        try:
            self.access.grant_experiment(team, experiment_id)
        except AccessNotGranted as exc:
            log.warning(
                "team %s's people cannot read its MLflow experiment %s yet (convtune mlflow-access sync grants it): %s", team, experiment_id, exc,
            )
            return
        self._team_reads.add(team)

    def _create_experiment(self, name: str, team: str | None) -> str:
        from mlflow.exceptions import MlflowException

        tags = {TAG.EXPERIMENT_KIND: EXPERIMENT_KIND, **({TAG.TEAM: team} if team else {})}
        try:
            return self.client.create_experiment(name, tags=tags)
        except MlflowException:  # another API process created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def _recorded_experiment(self, team: str) -> str | None:
        """The experiment the service recorded for ``team``; ServiceUnavailable when its database does not answer."""
        try:
            return open_claims(self.study_storage).team_experiment(self.experiment, team)
        except SQLAlchemyError as exc:
            raise ServiceUnavailable(f"the study storage ({storage_kind(self.study_storage)}) did not answer: {_short(exc)}") from exc

    def _create_team_experiment(self, team: str) -> str:
        """Create ``team``'s experiment and record it; another process's record wins a race (its experiment is used).

        A name that exists already is never taken as the team's: another API process may have just
        created it (its record then appears within moments), or an MLflow user did, to read the
        team's runs. That name is passed over for one with a random suffix.
        """
        from mlflow.exceptions import MlflowException

        name = experiment_name(self.experiment, team)
        tags = {TAG.EXPERIMENT_KIND: EXPERIMENT_KIND, TAG.TEAM: team}
        with self.translated():
            try:
                created = self.client.create_experiment(name, tags=tags)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                for _ in range(20):  # another process's record, made right after its create
                    time.sleep(0.1)
                    recorded = self._recorded_experiment(team)
                    if recorded is not None:
                        return recorded
                log.warning("an experiment named %r exists that convtune did not make for team %s: passed over", name, team)
                created = self.client.create_experiment(f"{name}-{secrets.token_hex(3)}", tags=tags)
        try:
            return open_claims(self.study_storage).record_team_experiment(self.experiment, team, created)
        except SQLAlchemyError as exc:
            raise ServiceUnavailable(f"the study storage ({storage_kind(self.study_storage)}) did not answer: {_short(exc)}") from exc

    def team_experiments(self) -> list[str]:
        """The id of every team's recorded experiment."""
        try:
            return list(open_claims(self.study_storage).team_experiments(self.experiment).values())
        except SQLAlchemyError as exc:
            raise ServiceUnavailable(f"the study storage ({storage_kind(self.study_storage)}) did not answer: {_short(exc)}") from exc

    def readable_experiments(self, principal: Principal) -> tuple[list[str], str]:
        """The experiments ``principal`` may list runs of, and the filter that keeps a list to its team's runs."""
        if principal.sees_all:
            teams = self.team_experiments()
            with self.translated():
                return experiment_ids(self.client, self.experiment, teams), ""
        own = self._experiment_ids.get(principal.team)
        if own is None and principal.team is not None:
            own = self._recorded_experiment(principal.team)
            if own is None:
                return [], ""  # the team has submitted nothing yet
            self._experiment_ids[principal.team] = own
        return [own], f" and tags.`{TAG.TEAM}` = '{principal.team}'"

    def ping(self) -> None:
        """Raise ServiceUnavailable unless MLflow answers."""
        with self.translated():
            self.client.search_experiments(max_results=1)

    def create(self, name: str, tags: dict[str, str], params: dict[str, str], principal: Principal) -> str:
        """Create a SCHEDULED run of ``principal``'s team in its experiment (its kind among ``tags``), params logged once, here."""
        owned = {**tags, TAG.OWNER: principal.name, **({TAG.TEAM: principal.team} if principal.team else {})}
        experiment_id = self.experiment_id(principal.team)
        with self.translated():
            return runs.create_run(self.client, experiment_id, name=name, tags=owned, params=params)

    def get_run(self, run_id: str, kind: str, what: str) -> RunRecord:
        """The run ``run_id`` of ``kind``; NotFound ("no {what} with id ...") otherwise."""
        if not RUN_ID.match(run_id):
            raise NotFound(f"no {what} with id {run_id!r}")
        with self.translated(run_id, what):
            run = self.client.get_run(run_id)
        if run.data.tags.get(TAG.KIND) != kind:
            raise NotFound(f"no {what} with id {run_id!r}")
        check_visible(run.data.tags, f"{what} with id {run_id!r}")
        return self.record(run)

    def record(self, run: Any) -> RunRecord:
        """The record of ``run``, its spec read back from its artifact when it was too long for a tag."""
        record = RunRecord.from_run(run)
        if TAG.SPEC_IN in record.tags and TAG.SPEC not in record.tags:
            with self.translated(record.id):
                record.tags = runs.with_spec(self.client, record.id, record.tags)
        return record

    def get(self, run_id: str) -> RunRecord:
        """The trial ``run_id``; NotFound when it is not a convtune trial."""
        return self.get_run(run_id, KIND.TRIAL, "trial")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        with self.translated(run_id):
            return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def search_runs(self, principal: Principal, kind: str, extra_filter: str, *, max_results: int, page_token: str | None) -> tuple[list[Any], str | None]:
        """Runs of ``kind`` that ``principal`` may read (its team's, or all), newest first; the page and the next page's token."""
        from mlflow.entities import ViewType

        experiments, own_team = self.readable_experiments(principal)
        if not experiments:
            return [], None
        with self.translated():
            page = self.client.search_runs(
                experiments, filter_string=f"tags.`{TAG.KIND}` = '{kind}'{extra_filter}{own_team}", run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results, order_by=["attributes.start_time DESC"], page_token=page_token,
            )
        return list(page), page.token

    def search(
        self, principal: Principal, *, status: str | None, max_results: int, page_token: str | None, filters: Any = None, study: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """Trials ``principal`` may read, newest first, optionally of one status, one study and the list ``filters``; the page and the next page's token."""
        extra = f" and {STATUS_FILTERS[status]}" if status else ""
        extra += f" and tags.`{TAG.STUDY_ID}` = '{study}'" if study else ""
        extra += filter_string(filters)
        page, token = self.search_runs(principal, KIND.TRIAL, extra, max_results=max_results, page_token=page_token)
        return [self.record(run) for run in page], token

    def queued_runs(self, principal: Principal, cap: int) -> tuple[int, list[str]]:
        """How much work ``principal`` (an API token) has queued (trials, studies, range tests), counted up to ``cap``, and their ids."""
        filters = f"tags.`{TAG.OWNER}` = '{principal.name}' and attributes.status = 'SCHEDULED'"
        experiment_id = self.experiment_id(principal.team)
        with self.translated():
            # MLflow returns at most 50,000 runs a page: a cap above that is never reached.
            found = self.client.search_runs([experiment_id], filter_string=filters, max_results=min(cap, 50_000))
        return len(found), [r.info.run_id for r in found]

    def end(self, run_id: str, status: str, outcome: str, reason: str) -> None:
        """End a run that no worker is running (failed at accept, cancelled while queued)."""
        with self.translated(run_id):
            runs.end_run(self.client, run_id, status, outcome, reason)
        try:  # its estimate stops counting against its team's quotas (service.api.quotas)
            open_usage(self.study_storage).close(run_id)
        except SQLAlchemyError as exc:
            log.warning("run %s: its usage row was not closed (%s); closed when its team's quota is next checked", run_id, _short(exc))

    def end_undispatched(self, run_id: str, detail: str) -> None:
        """End a run whose work was not sent (failed, ``not dispatched: detail``); never raises.

        Should MLflow fail too, the run stays SCHEDULED with nothing sent: logged here, for the
        reconciler to end. The client hears its 503 either way.
        """
        try:
            self.end(run_id, "FAILED", "error", f"not dispatched: {detail}")
        except ServiceUnavailable as exc:
            log.error("run %s was not dispatched and could not be marked failed (%s); the reconciler will end it", run_id, exc.detail)

    @staticmethod
    def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
        """The MLflow UI page of a run (the experiment's training view, not its GenAI overview)."""
        return f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:limit]

