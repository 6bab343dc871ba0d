"""Accepting a study: check it, record it (parent run, Optuna study), send its first steps.

It follows the trial's contract (ARCHITECTURE.md, decision 2): the study's parent run (SCHEDULED) and its
Optuna study (in the durable storage, with its spec, budget, grid and warm-start points) exist
before the first step message is sent; a storage or broker failure ends the parent run as failed
and the client hears 503. The steps then run on the workers (:mod:`workers.study.step`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from models.data import InvalidData, data_root_for, describe
from models.messages import StudyStepMessage
from models.sealing import split_secrets
from models.spec.objectives import constraint_problems
from models.spec.plan import InfeasibleArchitecture, NetworkPlan, plan_network
from models.spec.space import grid_points, space_problems
from models.spec.study import StudySpec
from models.store.claims import ClaimRefused, may_adopt, open_claims, registered_model
from models.store.runs import KIND, SPEC_TAG_LIMIT, TAG
from models.store.search import USER_ATTR, encode_params, open_storage, storage_kind
from models.store.share import Route
from service.api.accept import accept_run
from service.api.admission import check_callback_url, check_dataset_size, check_epochs, check_params, check_space, served_queue
from service.api.auth import Principal
from service.api.errors import FieldError, Forbidden, InfeasibleSpec, InvalidSpec, ServiceUnavailable
from service.api.limits import check_queued_quota
from service.api.quotas import check_compute_quota
from service.api.studies.records import StudyStore
from service.api.wiring import Services

__all__ = ["accept_study", "send_steps"]

log = logging.getLogger(__name__)


def accept_study(s: Services, store: StudyStore, spec: StudySpec, principal: Principal) -> str:
    """Check, record (parent run + Optuna study), send the first steps; the study id."""
    check_study(s, spec, principal.team)
    queue = served_queue(s.redis, spec.base.queue, s.settings, "base.queue")
    check_queued_quota(s.runs, s.redis, principal, s.settings)
    # Its budget of trials, each estimated as its base (a searched size or epochs may differ: the base is the estimate).
    reservation = check_compute_quota(s, principal, "study", queue, spec.base, _base_plan(s, spec, principal.team), trials=spec.budget)
    claimed = claim_model_name(s, spec.register_as.name, principal) if spec.register_as else False
    # MLflow's copies of the spec hold no secret (models.sealing): the Optuna storage keeps the whole spec, callbacks included.
    public, _ = split_secrets(spec.model_dump(mode="json"))

    def start(study_id: str) -> None:
        with s.runs.translated(study_id, "study"):
            s.runs.client.log_dict(study_id, public, "study/spec.json")
        if claimed:
            _note_claiming_study(s, spec.register_as.name, study_id)
        try:
            _create_study(store, study_id, spec, queue)
            budget = store.budget(study_id)
            budget.open(spec.budget, spec.parallelism)
            send_steps(s, study_id, budget.top_up().slots, Route(queue, principal.team, spec.priority))
        except Exception:
            _close_slots(store, study_id)
            raise

    study_id = accept_run(s, principal, "study", spec.display_name(), _parent_tags(s, spec, queue, public), _parent_params(spec), start, reservation)
    log.info("study %s accepted: %d trials, %d in parallel on %s (%s storage)", study_id, spec.budget, spec.parallelism, queue, storage_kind(s.settings.study_storage))
    return study_id


def _base_plan(s: Services, spec: StudySpec, team: str | None) -> NetworkPlan | None:
    """The base trial's network plan, for its FLOPs; None when its data is not known here or it does not fit (the space's checks said so)."""
    try:
        info = describe(spec.base.data, data_root_for(s.settings.data_root, team))
        return plan_network(spec.base.model, info) if info is not None else None
    except (InvalidData, InfeasibleArchitecture):
        return None


def _close_slots(store: StudyStore, study_id: str) -> None:
    try:
        store.budget(study_id).stop("error")
    except redis.RedisError:
        pass  # the parent run is failed: steps that were sent see it and stop


def check_study(s: Services, spec: StudySpec, team: str | None) -> None:
    """Limits of this service and, for file data the API can see (``team``'s), feasibility of the space."""
    check_callback_url(spec.callback_url, s.settings, "callback_url")
    check_callback_url(spec.base.callback_url, s.settings, "base.callback_url")
    check_params(spec.base, s.settings, team, field_prefix="base.")
    check_dataset_size(spec.base, s.settings, field_prefix="base.")  # data.* is never searched
    check_epochs(spec.base.optim.epochs, s.settings, "base.optim.epochs")
    check_space(spec, s.settings, team)  # the epochs it searches, and the size of every configuration it makes
    if spec.base.data.name in ("npz", "folder") and s.settings.data_root is not None:
        try:
            info = describe(spec.base.data, data_root_for(s.settings.data_root, team))
        except InvalidData as exc:
            raise InvalidSpec(str(exc), errors=[FieldError(field="base.data.path", message=str(exc))]) from exc
        problems = space_problems(spec, info) or constraint_problems(spec, spec.constraints, info)
        if problems:
            errors = [FieldError(field=".".join(str(p) for p in loc), message=m) for loc, m in problems]
            raise InfeasibleSpec(f"{len(errors)} problem(s) with the search space on this data: {errors[0].message}", errors=errors)


def claim_model_name(s: Services, name: str, principal: Principal) -> bool:
    """Claim the registered model name ``name`` for the caller's team (:mod:`models.store.claims`); whether this call claimed it.

    The first team to claim a name owns it; the same team claims it again freely. Raises Forbidden
    when another team holds it (never saying which), or when it exists in MLflow's registry
    unclaimed and the caller may not adopt it (:func:`models.store.claims.may_adopt`);
    ServiceUnavailable when the study storage or MLflow does not answer. Nothing else is created.
    """
    try:
        claims = open_claims(s.settings.study_storage)
        held = claims.holder(name)
        if held is not None:
            if held.team != principal.team:
                raise ClaimRefused(name)
            return False
        with s.runs.translated():
            model = registered_model(s.runs.client, name)
        if model is not None and not may_adopt(model, principal.team, claims.since, admin=principal.is_admin):
            raise Forbidden(f"the registered model {name!r} exists in the model registry but was not registered by this team's studies; choose another register_as name")
        _, new = claims.claim(name, principal.team, adopted=None if model is None else model.creation_timestamp)
        return new
    except ClaimRefused as exc:
        raise Forbidden(f"the registered model name {name!r} is claimed by another team; choose another register_as name") from exc
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"the study storage ({storage_kind(s.settings.study_storage)}) did not answer: {str(exc)[:300]}") from exc


def _note_claiming_study(s: Services, name: str, study_id: str) -> None:
    try:
        open_claims(s.settings.study_storage).note_study(name, study_id)
    except SQLAlchemyError as exc:  # the claim holds without it: the study id is for people reading the table
        log.warning("study %s: the claim on %r does not name it: %s", study_id, name, exc)


def send_steps(s: Services, study_id: str, slots: list[int], route: Route) -> None:
    """Send one step message per slot; ServiceUnavailable when the broker does not take one."""
    for slot in slots:
        s.send(StudyStepMessage(study_id=study_id, slot=slot), route)


def _parent_params(spec: StudySpec) -> dict[str, str]:
    return {
        "study.sampler": spec.sampler.name, "study.pruner": spec.pruner.name, "study.objective": ",".join(g.metric for g in spec.goals),
        "study.direction": ",".join(spec.directions), "study.seed": str(spec.seed), "study.parallelism": str(spec.parallelism),
        **({"study.constraints": "; ".join(str(c) for c in spec.constraints)[:6000]} if spec.constraints else {}),
        **({"study.register_rule": spec.selection_rule[:6000]} if spec.register_as else {}),
        **{f"space.{k}": json.dumps(p.model_dump(exclude_none=True, exclude={"type"}) if p.type != "categorical" else p.choices)[:6000] for k, p in spec.search_space.items()},
    }


def _parent_tags(s: Services, spec: StudySpec, queue: str, public: dict[str, Any]) -> dict[str, str]:
    """The parent run's tags (``public``: the spec without its secrets, kept whole in a tag when it fits)."""
    spec_json = json.dumps(public, separators=(",", ":"))
    return {
        TAG.KIND: KIND.STUDY, TAG.QUEUE: queue, TAG.PRIORITY: spec.priority, TAG.N_TRIALS: str(spec.budget),
        TAG.STUDY_STORAGE: storage_kind(s.settings.study_storage),
        **({TAG.STUDY_SPEC: spec_json} if len(spec_json) <= SPEC_TAG_LIMIT else {}),  # else study/spec.json alone
        **{f"user.{k}": v for k, v in spec.tags.items()},
    }


def _create_study(store: StudyStore, study_id: str, spec: StudySpec, queue: str) -> Any:
    import optuna

    with store.storage_errors():
        study = optuna.create_study(storage=open_storage(store.settings.study_storage), study_name=study_id, directions=spec.directions)
        for key, value in ((USER_ATTR.SPEC, spec.model_dump_json()), (USER_ATTR.BUDGET, spec.budget), (USER_ATTR.QUEUE, queue), (USER_ATTR.STARTED_AT, time.time())):
            study.set_user_attr(key, value)
        # Warm-start points first, then the grid: each worker step takes the next enqueued point.
        for point in spec.warm_start:
            study.enqueue_trial(encode_params(spec, point), skip_if_exists=True)
        if spec.sampler.name == "grid":
            for point in grid_points(spec)[: spec.budget]:
                study.enqueue_trial(encode_params(spec, point), skip_if_exists=bool(spec.warm_start))
    return study
