"""Reading studies back: the parent run from MLflow and, when its storage answers, the Optuna study.

The API's errors are translated where they enter: a study that does not exist is NotFound, MLflow
or the study storage not answering is ServiceUnavailable (503).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from models.spec.study import StudySpec
from models.store.budget import StudyBudget
from models.store.runs import KIND, TAG, study_state
from models.store.search import USER_ATTR, open_storage, storage_kind
from service.api.auth import Principal, check_visible
from service.api.errors import InvalidSpec, NotFound, ServiceUnavailable
from service.api.runs import RUN_ID, STUDY_STATUS_FILTERS, RunRecord, RunStore, filter_string
from service.api.settings import ApiSettings

__all__ = ["StudyRecord", "StudyStore"]


@dataclass
class StudyRecord(RunRecord):
    """A study as the API reads it: its parent run and, when its storage answers, its Optuna study."""

    spec: StudySpec
    study: Any | None  # optuna.Study
    stopped: str

    @property
    def state(self) -> str:
        return study_state(self.mlflow_status, self.stopped)


class StudyStore:
    """Studies in MLflow (their parent runs), the Optuna storage and Redis (their slots), with errors translated."""

    def __init__(self, settings: ApiSettings, runs: RunStore, redis_client: redis.Redis):
        self.settings = settings
        self.runs = runs
        self.client = runs.client
        self.redis = redis_client

    def get(self, study_id: str) -> StudyRecord:
        """The study ``study_id``; NotFound when it is not a convtune study."""
        if not RUN_ID.match(study_id):
            raise NotFound(f"no study with id {study_id!r}")
        with self.runs.translated(study_id, "study"):
            run = self.client.get_run(study_id)
        if run.data.tags.get(TAG.KIND) != KIND.STUDY:
            raise NotFound(f"no study with id {study_id!r}")
        check_visible(run.data.tags, f"study with id {study_id!r}")
        return self._record(run)

    def search(
        self, principal: Principal, *, max_results: int, page_token: str | None, status: str | None = None, filters: Any = None,
    ) -> tuple[list[StudyRecord], str | None]:
        """Studies ``principal`` may read, newest first, filtered (from MLflow alone; each record's Optuna study is read on demand)."""
        extra = (f" and {STUDY_STATUS_FILTERS[status]}" if status else "") + filter_string(filters)
        page, token = self.runs.search_runs(principal, KIND.STUDY, extra, max_results=max_results, page_token=page_token)
        return [self._record(run) for run in page], token

    def budget(self, study_id: str) -> StudyBudget:
        return StudyBudget(self.redis, study_id)

    def _record(self, run: Any) -> StudyRecord:
        import optuna

        study, spec = None, None
        try:
            with self.storage_errors():
                study = optuna.load_study(study_name=run.info.run_id, storage=open_storage(self.settings.study_storage))
            spec = StudySpec.model_validate_json(study.user_attrs[USER_ATTR.SPEC], context={"stored": True})
        except KeyError:
            study = None  # accepted, then its storage failed: only the parent run tells
        if spec is None:
            raw = run.data.tags.get(TAG.STUDY_SPEC)
            spec = StudySpec.model_validate_json(raw, context={"stored": True}) if raw else StudySpec.model_validate(self._spec_artifact(run.info.run_id), context={"stored": True})
        try:
            stopped = StudyBudget(self.redis, run.info.run_id).stopped()
        except redis.RedisError:
            stopped = ""
        if not stopped and study is not None:
            stopped = json.loads(study.user_attrs.get(USER_ATTR.STOPPED, "{}")).get("why", "")
        return StudyRecord.from_run(run, spec=spec, study=study, stopped=stopped)

    def _spec_artifact(self, study_id: str) -> dict[str, Any]:
        """A spec too long for a tag, read back from the parent run's artifact."""
        with self.runs.translated(study_id, "study"), tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(self.client.download_artifacts(study_id, "study/spec.json", tmp)).read_text())

    @contextmanager
    def storage_errors(self) -> Iterator[None]:
        """Translate the study storage's errors inside the block to ServiceUnavailable (KeyError: no such study)."""
        try:
            yield
        except (KeyError, ServiceUnavailable, InvalidSpec):
            raise
        except Exception as exc:  # sqlalchemy OperationalError, OSError on the journal file, redis
            raise ServiceUnavailable(f"the study storage ({storage_kind(self.settings.study_storage)}) did not answer: {str(exc)[:300]}") from exc
