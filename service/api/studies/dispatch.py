"""Accepting, extending and cancelling studies; reading them back from MLflow and the Optuna storage.

Accepting follows the trial's contract (DESIGN decision 3): the study's parent run (SCHEDULED) and
its Optuna study (in the durable storage, with its spec, budget, grid and warm-start points) exist
before the first step message is sent; a storage or broker failure ends the parent run as failed
and the client hears 503. The steps then run on the workers (:mod:`workers.study.step`); this module
only sends the first ``parallelism`` of them, and more on ``/extend``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import redis

from models.store.budget import StudyBudget
from models.data.sets import InvalidData, describe
from models.messages import TASK_STUDY_STEP
from models.store.keys import cancel_key
from models.store.runs import TAG
from models.store.search import USER_ATTR, encode_params, open_storage, storage_kind
from models.spec.space import space_problems
from models.spec.study import StudySpec, grid_points, param_values
from service.api.auth import current_principal
from service.api.dispatch import check_callback_url
from service.api.errors import Conflict, FieldError, InfeasibleSpec, InvalidSpec, NotFound, ServiceUnavailable
from service.api.runs import RUN_ID, RunRecord, RunStore
from service.api.settings import ApiSettings

__all__ = ["StudyDispatcher", "StudyRecord"]

log = logging.getLogger(__name__)
_STATE = {"SCHEDULED": "queued", "RUNNING": "running", "FINISHED": "succeeded", "FAILED": "failed", "KILLED": "cancelled"}


@dataclass
class StudyRecord(RunRecord):
    """A study as the API reads it: its parent run and, when its storage answers, its Optuna study."""

    spec: StudySpec
    study: Any | None  # optuna.Study
    stopped: str

    @property
    def state(self) -> str:
        if self.mlflow_status in ("SCHEDULED", "RUNNING") and self.stopped == "cancelled":
            return "cancelling"
        return _STATE.get(self.mlflow_status, "failed")


class StudyDispatcher:
    """The API's side of a study's life."""

    def __init__(self, settings: ApiSettings, runs: RunStore, celery: Any, redis_client: redis.Redis):
        self.settings = settings
        self.runs = runs
        self.celery = celery
        self.redis = redis_client

    # --- accept ----------------------------------------------------------------------------------

    def accept(self, spec: StudySpec) -> str:
        """Check, record (parent run + Optuna study), send the first steps; the study id."""
        self._check(spec)
        queue = spec.base.queue or self.settings.default_queue
        study_id = self._create_parent(spec, queue)
        try:
            self._create_study(study_id, spec, queue)
            budget = StudyBudget(self.redis, study_id)
            budget.open(spec.budget, spec.parallelism)
            self._send(study_id, budget.top_up().slots, queue)
        except ServiceUnavailable as exc:
            log.warning("study %s not started, marking it failed: %s", study_id, exc.detail)
            self._end_parent(study_id, "FAILED", "error", f"not dispatched: {exc.detail}")
            self._try_stop(study_id, "error")
            raise
        log.info("study %s accepted: %d trials, %d in parallel on %s (%s storage)", study_id, spec.budget, spec.parallelism, queue, storage_kind(self.settings.study_storage))
        return study_id

    def _check(self, spec: StudySpec) -> None:
        """Limits of this service and, for file data the API can see, feasibility of the space."""
        check_callback_url(spec.callback_url, self.settings.callback_hosts, "callback_url")
        check_callback_url(spec.base.callback_url, self.settings.callback_hosts, "base.callback_url")
        searched = spec.search_space.get("optim.epochs")
        epochs = max([spec.base.optim.epochs, *(param_values(searched) if searched else [])])
        if epochs > self.settings.max_epochs:
            message = f"at most {self.settings.max_epochs} epochs are allowed on this service"
            raise InvalidSpec(message, errors=[FieldError(field="base.optim.epochs", message=message)])
        if spec.base.data.name in ("npz", "folder") and self.settings.data_root is not None:
            try:
                info = describe(spec.base.data, self.settings.data_root)
            except InvalidData as exc:
                raise InvalidSpec(str(exc), errors=[FieldError(field="base.data.path", message=str(exc))]) from exc
            problems = space_problems(spec, info)
            if problems:
                errors = [FieldError(field=".".join(str(p) for p in loc), message=m) for loc, m in problems]
                raise InfeasibleSpec(f"{len(errors)} problem(s) with the search space on this data: {errors[0].message}", errors=errors)

    def _create_parent(self, spec: StudySpec, queue: str) -> str:
        from mlflow.entities import Param, RunTag

        params = {
            "study.sampler": spec.sampler.name, "study.pruner": spec.pruner.name, "study.objective": spec.objective.metric,
            "study.direction": spec.objective.resolved_direction, "study.seed": str(spec.seed), "study.parallelism": str(spec.parallelism),
            **{f"space.{k}": json.dumps(p.model_dump(exclude_none=True, exclude={"type"}) if p.type != "categorical" else p.choices)[:6000] for k, p in spec.search_space.items()},
        }
        spec_json = spec.model_dump_json()
        tags = {
            TAG.KIND: "study", TAG.RUN_NAME: spec.display_name(), TAG.QUEUE: queue, "convtune.n_trials": str(spec.budget),
            TAG.OWNER: current_principal().name,  # only this token (or an admin) may cancel or extend it
            "convtune.study_storage": storage_kind(self.settings.study_storage),
            **({"convtune.study_spec": spec_json} if len(spec_json) <= 7000 else {}),
            **{f"user.{k}": v for k, v in spec.tags.items()},
        }
        with self._translated():
            run = self.runs.client.create_run(self.runs.experiment_id(), run_name=spec.display_name(), tags=tags)
            study_id = run.info.run_id
            self.runs.client.update_run(study_id, status="SCHEDULED")
            batch = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(batch), 100):
                self.runs.client.log_batch(study_id, params=batch[i : i + 100], tags=[RunTag(TAG.ACCEPTED_AT, _now_iso())])
            self.runs.client.log_dict(study_id, spec.model_dump(mode="json"), "study/spec.json")
        return study_id

    def _create_study(self, study_id: str, spec: StudySpec, queue: str) -> Any:
        import optuna

        with self._storage_errors():
            study = optuna.create_study(storage=open_storage(self.settings.study_storage), study_name=study_id, direction=spec.objective.resolved_direction)
            for key, value in ((USER_ATTR.SPEC, spec.model_dump_json()), (USER_ATTR.BUDGET, spec.budget), (USER_ATTR.QUEUE, queue), (USER_ATTR.STARTED_AT, time.time())):
                study.set_user_attr(key, value)
            # Warm-start points first, then the grid: each worker step takes the next enqueued point.
            for point in spec.warm_start:
                study.enqueue_trial(encode_params(spec, point), skip_if_exists=True)
            if spec.sampler.name == "grid":
                for point in grid_points(spec)[: spec.budget]:
                    study.enqueue_trial(encode_params(spec, point), skip_if_exists=bool(spec.warm_start))
        return study

    def _send(self, study_id: str, slots: list[int], queue: str) -> None:
        for slot in slots:
            try:
                self.celery.send_task(TASK_STUDY_STEP, kwargs={"study_id": study_id, "slot": slot}, queue=queue, task_id=f"{study_id}-{slot}", retry=False)
            except Exception as exc:  # kombu OperationalError, redis ConnectionError, OSError...
                raise ServiceUnavailable(f"the broker (Redis) did not accept the study's steps: {exc}") from exc

    # --- read --------------------------------------------------------------------------------------

    def get(self, study_id: str) -> StudyRecord:
        """The study ``study_id``; NotFound when it is not a convtune study."""
        if not RUN_ID.match(study_id):
            raise NotFound(f"no study with id {study_id!r}")
        with self._translated(study_id):
            run = self.runs.client.get_run(study_id)
        if run.data.tags.get(TAG.KIND) != "study":
            raise NotFound(f"no study with id {study_id!r}")
        return self._record(run)

    def _record(self, run: Any, with_study: bool = True) -> StudyRecord:
        import optuna

        study, spec = None, None
        if with_study:
            try:
                with self._storage_errors():
                    study = optuna.load_study(study_name=run.info.run_id, storage=open_storage(self.settings.study_storage))
                spec = StudySpec.model_validate_json(study.user_attrs[USER_ATTR.SPEC], context={"stored": True})
            except KeyError:
                study = None  # accepted, then its storage failed: only the parent run tells
        if spec is None:
            raw = run.data.tags.get("convtune.study_spec")
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
        import tempfile
        from pathlib import Path

        with self._translated(study_id), tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(self.runs.client.download_artifacts(study_id, "study/spec.json", tmp)).read_text())

    def search(self, *, max_results: int, page_token: str | None) -> tuple[list[StudyRecord], str | None]:
        """Studies newest first (from MLflow alone; each record's Optuna study is read on demand)."""
        from mlflow.entities import ViewType

        with self._translated():
            page = self.runs.client.search_runs(
                [self.runs.experiment_id()], filter_string=f"tags.`{TAG.KIND}` = 'study'", run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results, order_by=["attributes.start_time DESC"], page_token=page_token,
            )
        return [self._record(run) for run in page], page.token

    # --- cancel and extend ------------------------------------------------------------------------

    def cancel(self, record: StudyRecord) -> None:
        """Start no more trials and raise the cancel flag of each running one; the last step ends the study."""
        if record.terminal:
            raise Conflict(f"study {record.id} has already ended ({record.state}); there is nothing to cancel")
        budget = StudyBudget(self.redis, record.id)
        try:
            budget.stop("cancelled")
            if record.study is not None:
                record.study.set_user_attr(USER_ATTR.STOPPED, json.dumps({"why": "cancelled", "reason": "cancelled on request"}))
                for trial in record.study.get_trials(deepcopy=False):
                    trial_id = trial.user_attrs.get(USER_ATTR.TRIAL_ID)
                    if trial.state.name == "RUNNING" and trial_id:
                        self.redis.set(cancel_key(trial_id), "1", ex=self.settings.visibility_timeout_s * 2)
            in_flight = int(budget.state().get("inflight", "0"))
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
        if in_flight <= 0:
            # No step will come to end it: nothing was in flight (or Redis lost the counters).
            self._end_parent(record.id, "KILLED", "cancelled", "cancelled on request")

    def extend(self, record: StudyRecord, n_trials: int, warm_start: list[dict[str, Any]]) -> int:
        """Add trials (and warm-start points to try first); the number added."""
        if record.state in ("cancelled", "cancelling"):
            raise Conflict(f"study {record.id} was cancelled; start a new study instead of extending it")
        if record.study is None:
            raise ServiceUnavailable(f"study {record.id} is not in this service's study storage", retry_after_s=60)
        spec = self._validated_warm_start(record.spec, warm_start)
        added = max(n_trials, len(warm_start))
        if added == 0:
            message = "give n_trials > 0 or warm_start configurations"
            raise InvalidSpec(message, errors=[FieldError(field="n_trials", message=message)])
        study = record.study
        if spec.sampler.name == "grid":
            waiting = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING")
            remaining = len(grid_points(spec)) - int(study.user_attrs[USER_ATTR.BUDGET]) + len(warm_start)
            if added > max(waiting, 0) + max(remaining, 0):
                message = f"the grid has {max(remaining, 0)} points left to run; add warm_start configurations for more"
                raise InvalidSpec(message, errors=[FieldError(field="n_trials", message=message)])
        with self._storage_errors():
            for point in warm_start:
                study.enqueue_trial(encode_params(spec, point), skip_if_exists=True)
            if spec.sampler.name == "grid":
                start = int(study.user_attrs[USER_ATTR.BUDGET])  # the points past the budget were not enqueued yet
                for point in grid_points(spec)[start : start + max(0, added - len(warm_start))]:
                    study.enqueue_trial(encode_params(spec, point), skip_if_exists=True)
            new_budget = int(study.user_attrs[USER_ATTR.BUDGET]) + added
            study.set_user_attr(USER_ATTR.BUDGET, new_budget)
            study.set_user_attr(USER_ATTR.STARTED_AT, time.time())  # a timeout counts from the extension
            study.set_user_attr(USER_ATTR.STOPPED, "{}")
        queue = study.user_attrs[USER_ATTR.QUEUE]
        budget = StudyBudget(self.redis, record.id)
        try:
            if budget.exists():
                budget.add(added)
            else:
                started = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING")
                budget.open(new_budget, spec.parallelism, claimed=started)
            if record.terminal:
                self._reopen_parent(record.id, new_budget)
            else:
                self.runs.client.set_tag(record.id, "convtune.n_trials", str(new_budget))
            self._send(record.id, budget.top_up().slots, queue)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
        return added

    def _validated_warm_start(self, spec: StudySpec, warm_start: list[dict[str, Any]]) -> StudySpec:
        from pydantic import ValidationError

        if not warm_start:
            return spec
        try:
            return StudySpec.model_validate({**spec.model_dump(mode="json"), "warm_start": warm_start})
        except ValidationError as exc:
            raise InvalidSpec.from_validation_error(exc) from exc

    def _reopen_parent(self, study_id: str, budget: int) -> None:
        from mlflow.exceptions import MlflowException

        with self._translated(study_id):
            for key in (TAG.OUTCOME, TAG.REASON):
                with suppress(MlflowException):  # absent already
                    self.runs.client.delete_tag(study_id, key)
            self.runs.client.set_tag(study_id, "convtune.n_trials", str(budget))
            self.runs.client.update_run(study_id, status="RUNNING")

    def _end_parent(self, study_id: str, status: str, outcome: str, reason: str) -> None:
        from mlflow.entities import RunTag

        with self._translated(study_id):
            self.runs.client.log_batch(study_id, tags=[RunTag(TAG.OUTCOME, outcome), RunTag(TAG.REASON, reason)])
            self.runs.client.set_terminated(study_id, status=status)

    def _try_stop(self, study_id: str, why: str) -> None:
        try:
            StudyBudget(self.redis, study_id).stop(why)
        except redis.RedisError:
            pass  # the parent run is failed: steps that were sent see it and stop

    # --- error translation ------------------------------------------------------------------------

    @contextmanager
    def _translated(self, study_id: str | None = None) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            if study_id and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise NotFound(f"no study with id {study_id!r}") from exc
            raise ServiceUnavailable(f"the tracking server (MLflow) did not answer: {str(exc)[:300]}") from exc
        except OSError as exc:
            raise ServiceUnavailable(f"the tracking server (MLflow) is unreachable: {str(exc)[:300]}") from exc

    @contextmanager
    def _storage_errors(self) -> Iterator[None]:
        try:
            yield
        except (KeyError, ServiceUnavailable, InvalidSpec):
            raise
        except Exception as exc:  # sqlalchemy OperationalError, OSError on the journal file, redis
            raise ServiceUnavailable(f"the study storage ({storage_kind(self.settings.study_storage)}) did not answer: {str(exc)[:300]}") from exc


def _now_iso() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat()
