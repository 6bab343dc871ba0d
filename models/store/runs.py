"""A convtune run's life in MLflow: what it is, its tags, its statuses, how it is created and ended.

A trial's id *is* its MLflow run id; a study's is its parent run's; a range test's is its own run's.
Every site that creates or ends one of them calls this module, so every run is created the same
way (SCHEDULED, its tags and params logged once, at creation; a study's trial, which the step that
creates it trains at once, RUNNING from the start) and ends the same way (exactly one
``convtune.outcome`` and ``convtune.reason``, then its terminal MLflow status). A client sees
``queued`` (SCHEDULED), ``running`` (RUNNING), then the ended run's status from its outcome: the
outcome table (:mod:`models.spec.outcomes`) gives each outcome's MLflow status and client status.

The functions take an ``MlflowClient``; the API translates MLflow's errors where it calls them
(:mod:`service.api.runs`), the workers let them propagate so the message is retried.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.compat import CompatError, mlflow_store
from models.sealing import SealBroken, split_secrets, with_secrets
from models.spec.outcomes import OUTCOMES, OutcomeName
from models.store.share import PRIORITIES, Route
from models.store.teams import TEAM_TAG, team_of

if TYPE_CHECKING:
    from mlflow.entities import Metric, RunInfo
    from mlflow.tracking import MlflowClient

    from models.sealing import Sealer
    from models.spec.plan import NetworkPlan
    from models.spec.trial import TrialSpec

__all__ = [
    "EXPERIMENT_KIND", "KIND", "TAG", "TERMINAL_STATUSES", "TrialOutcome", "client_status", "create_run", "create_started_run", "created_tags", "end_run",
    "reopen_run", "run_route", "run_spec", "spec_tags", "start_run", "study_state", "trial_tags",
]

# Every ended trial carries exactly one outcome (the table's names); 'succeeded' is the only good one.
TrialOutcome = OutcomeName
# MLflow run statuses of a run that has ended: a message for such a run is a duplicate.
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

EXPERIMENT_KIND = "custom_model_development"
# MLflow keeps a tag value in at most 8,000 characters (a column of that size on Postgres; sqlite does not
# check): a spec longer than this (twenty user tags of 500 characters make one) goes in an artifact.
SPEC_TAG_LIMIT = 7000
SPEC_ARTIFACT = "convtune/spec.json"
# MLflow caps a tag value at 8,000 characters and a reason need not be longer than this.
MAX_REASON = 5000


class KIND:
    """Values of TAG.KIND: what a convtune MLflow run is."""

    TRIAL = "trial"
    STUDY = "study"
    LR_FINDER = "lr_finder"


class TAG:
    """MLflow tag keys convtune writes on runs (every ``convtune.*`` key is here)."""

    KIND = "convtune.kind"  # "trial", "study" or "lr_finder" (see KIND)
    OUTCOME = "convtune.outcome"
    REASON = "convtune.reason"
    SPEC = "convtune.spec"  # the validated TrialSpec (or LrRangeSpec) as JSON, when it fits in a tag
    SPEC_IN = "convtune.spec_artifact"  # else: the run's artifact that holds it (SPEC_ARTIFACT), its secret fields null (models.sealing)
    SEALED = "convtune.sealed"  # those secret fields, sealed with the service's key (models.sealing.Sealer)
    OWNER = "convtune.owner"  # the name of the API token that submitted it
    TEAM = TEAM_TAG  # the team of that token: who may read and change it (models.store.teams)
    PARAMS_COUNT = "convtune.params_count"
    FLOPS = "convtune.flops_per_sample"
    QUEUE = "convtune.queue"
    PRIORITY = "convtune.priority"  # low, normal or high: its place among its team's waiting work (models.store.share)
    ATTEMPTS = "convtune.attempts"
    EPOCHS_DONE = "convtune.epochs_done"
    FENCE = "convtune.fence"  # the fence of the lease its latest holder took (workers.trial.lease): an earlier holder's writes are refused
    MODEL_ID = "convtune.model_id"  # the MLflow logged model of its trained net (models:/<id>), set with its ending
    DEVICE = "convtune.device"
    DEVICE_KIND = "convtune.device_kind"  # what it trained on, at its end: "cpu" or the CUDA device's name
    ACCEPTED_AT = "convtune.accepted_at"  # ISO time the API accepted it
    STARTED_AT = "convtune.started_at"  # ISO time a worker first started it
    # What a worker resolved before training (workers.training.batching.BatchPlan).
    BATCH_SIZE = "convtune.batch_size"
    ACCUMULATE_STEPS = "convtune.accumulate_steps"
    EFFECTIVE_BATCH_SIZE = "convtune.effective_batch_size"
    LR_EFFECTIVE = "convtune.lr_effective"
    BATCH_PROBE = "convtune.batch_probe"
    CHECKPOINT_LOST = "convtune.checkpoint_lost"  # why a delivery could not resume from the checkpoint there was (it trained from epoch 1)
    # Provenance, with the start tags of each delivery (workers.trial.provenance): what code, libraries, device and data it ran with.
    VERSION = "convtune.version"  # the installed convtune distribution's version
    COMMIT = "convtune.commit"  # the source's git commit, or "unknown"
    TORCH = "convtune.torch"
    CUDA = "convtune.cuda"  # the CUDA torch was built with, or "none"
    CUDNN = "convtune.cudnn"  # cuDNN's version, or "none"
    DEVICE_NAME = "convtune.device_name"  # "cpu" or the CUDA device's name
    PYTHON = "convtune.python"
    DATA_FINGERPRINT = "convtune.data_fingerprint"  # models.data.fingerprint: which images it trained on
    # A trial of a study.
    STUDY_ID = "convtune.study_id"
    STUDY_TRIAL = "convtune.study_trial"  # its Optuna trial number
    # A study's parent run.
    N_TRIALS = "convtune.n_trials"
    STUDY_STORAGE = "convtune.study_storage"
    STUDY_SPEC = "convtune.study_spec"  # the StudySpec as JSON, when it fits in a tag (else the study/spec.json artifact)
    TRIAL_COUNTS = "convtune.trial_counts"
    SELECTION = "convtune.selection"  # the rule that chose the study's trial (models.spec.objectives)
    BEST_TRIAL_ID = "convtune.best_trial_id"
    BEST_TRIAL_NUMBER = "convtune.best_trial_number"
    BEST_PREFIX = "convtune.best."  # + a searched path: the best trial's value of it
    REGISTERED_MODEL = "convtune.registered_model"
    REGISTERED_VERSION = "convtune.registered_version"
    REGISTERED_ALIAS = "convtune.registered_alias"
    REGISTRATION_ERROR = "convtune.registration_error"
    LR_AUTO_RANGE = "convtune.lr_auto.range"
    LR_AUTO_TEST_ID = "convtune.lr_auto.test_id"
    # A registered model version: the trial it came from.
    TRIAL_ID = "convtune.trial_id"
    # An LR range test's result and progress (workers.trial.lr_finder).
    SUGGESTED_LR = "convtune.suggested_lr"
    LARGEST_STABLE_LR = "convtune.largest_stable_lr"
    STEPS_DONE = "convtune.steps_done"
    # MLflow's own.
    RUN_NAME = "mlflow.runName"
    PARENT = "mlflow.parentRunId"
    EXPERIMENT_KIND = "mlflow.experimentKind"


def client_status(mlflow_status: str, outcome: str | None) -> str:
    """The status a client sees (``queued`` ... ``failed``) of a run's MLflow status and outcome tag."""
    by_mlflow = {"SCHEDULED": "queued", "RUNNING": "running", "KILLED": "cancelled"}
    if mlflow_status in by_mlflow:
        return by_mlflow[mlflow_status]
    if mlflow_status == "FINISHED":
        # The status decides first: a run ended FINISHED with an outcome of another status (or none) still succeeded.
        ended = OUTCOMES.get(outcome or "")
        return ended.client_status if ended is not None and ended.mlflow_status == "FINISHED" else "succeeded"
    return "failed"


def study_state(mlflow_status: str, stopped: str = "") -> str:
    """The state a client sees of a study (its parent run's status; ``cancelling`` while its last trials stop)."""
    if mlflow_status in ("SCHEDULED", "RUNNING") and stopped == "cancelled":
        return "cancelling"
    return {"SCHEDULED": "queued", "RUNNING": "running", "FINISHED": "succeeded", "KILLED": "cancelled"}.get(mlflow_status, "failed")


def trial_tags(spec: TrialSpec, plan: NetworkPlan | None, queue: str, sealer: Sealer | None = None, **extra: str) -> dict[str, str]:
    """The tags a trial's run is created with, by the API or by a study's step (``extra``: owner, study...).

    Its secret fields are sealed with ``sealer`` (:func:`spec_tags`); a study's trial has none to keep
    (the study's spec, in the Optuna storage, holds its callback).
    """
    return {
        TAG.KIND: KIND.TRIAL,
        **spec_tags(spec.model_dump(mode="json"), sealer),
        TAG.QUEUE: queue,
        TAG.PRIORITY: spec.priority,
        **({TAG.PARAMS_COUNT: str(plan.params), TAG.FLOPS: str(plan.flops)} if plan else {}),
        **{f"user.{k}": v for k, v in spec.tags.items()},
        **extra,
    }


def run_route(tags: Mapping[str, str]) -> Route:
    """Where a run's messages go, from its tags: its queue, its team and its priority (``normal`` when it has none)."""
    priority = tags.get(TAG.PRIORITY, "normal")
    return Route(tags.get(TAG.QUEUE, "gpu"), team_of(tags), priority if priority in PRIORITIES else "normal")


def spec_tags(document: dict[str, Any], sealer: Sealer | None) -> dict[str, str]:
    """``TAG.SPEC``, the spec (as JSON) with its secret fields null, and ``TAG.SEALED``, those fields sealed.

    Without a ``sealer`` the secrets are dropped: MLflow never holds one in clear (models.sealing).
    """
    public, secrets = split_secrets(document)
    tags = {TAG.SPEC: json.dumps(public, separators=(",", ":"))}
    if secrets and sealer is not None:
        tags[TAG.SEALED] = sealer.seal(secrets)
    return tags


def with_spec(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> dict[str, str]:
    """``tags``, with ``TAG.SPEC`` read back from the run's artifact when the spec was too long for a tag (one more request)."""
    if TAG.SPEC in tags or TAG.SPEC_IN not in tags:
        return dict(tags)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run_id, tags[TAG.SPEC_IN], tmp)).read_text()
    return {**tags, TAG.SPEC: text}


def run_spec(tags: Mapping[str, str], sealer: Sealer | None) -> dict[str, Any] | None:
    """The spec a run was submitted with, its sealed secrets put back: what a message for it carries.

    None when the run has no spec tag (a spec in an artifact is read into the tags by :func:`with_spec`).
    Raises models.sealing.SealBroken when it has sealed secrets that ``sealer`` cannot open (or there is
    no sealer).
    """
    raw = tags.get(TAG.SPEC)
    if raw is None:
        return None
    spec = json.loads(raw)
    sealed = tags.get(TAG.SEALED)
    if not sealed:
        return spec
    if sealer is None:
        raise SealBroken("the run's secrets are sealed and this process has no secret key (CONVTUNE_SECRET_KEY) to open them")
    return with_secrets(spec, sealer.unseal(sealed))


def create_run(
    client: MlflowClient, experiment_id: str, *, name: str, tags: Mapping[str, str], params: Mapping[str, str] | None = None,
) -> str:
    """Create a run SCHEDULED, with its name, ``tags`` (``TAG.KIND`` among them) and ``params`` logged once; its id."""
    return _create(client, experiment_id, name, tags, params, scheduled=True).run_id


def create_started_run(
    client: MlflowClient, experiment_id: str, *, name: str, tags: Mapping[str, str], params: Mapping[str, str] | None = None,
) -> RunInfo:
    """Create a run its creator trains at once (a study's trial): RUNNING, as MLflow creates it, never SCHEDULED.

    Two requests fewer than :func:`create_run` + :func:`start_run`, on every trial of a study. ``TAG.STARTED_AT`` comes
    when training starts, under the trial's lease: until then the reconciler counts it as queued
    (:func:`workers.reconciler.judge.run_status`). Its info (the artifact URI among it).
    """
    info = _create(client, experiment_id, name, tags, params, scheduled=False)
    _created_tags[info.run_id] = dict(tags)
    while len(_created_tags) > _CREATED_KEPT:
        _created_tags.pop(next(iter(_created_tags)))
    return info


# The tags of the runs this process created RUNNING a moment ago (create_started_run), for their trainer,
# which does not read its run back: its study and queue, for the run's accounting. The latest few only.
_created_tags: dict[str, dict[str, str]] = {}
_CREATED_KEPT = 64


def created_tags(run_id: str) -> dict[str, str]:
    """The tags :func:`create_started_run` gave ``run_id`` in this process; empty when it did not create it here."""
    return dict(_created_tags.get(run_id, {}))


def _create(
    client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, str], params: Mapping[str, str] | None, *, scheduled: bool,
) -> RunInfo:
    from mlflow.entities import Param, RunTag

    assert TAG.KIND in tags, "every convtune run says what it is"
    spec_text = tags.get(TAG.SPEC, "")
    if len(spec_text) > SPEC_TAG_LIMIT:  # too long for a tag: in the run's artifact instead, written before anything reads it
        tags = {**{k: v for k, v in tags.items() if k != TAG.SPEC}, TAG.SPEC_IN: SPEC_ARTIFACT}
    run = client.create_run(experiment_id, run_name=name, tags={TAG.RUN_NAME: name, **tags})
    run_id = run.info.run_id
    try:
        if TAG.SPEC_IN in tags:
            client.log_text(run_id, spec_text, SPEC_ARTIFACT)
        if scheduled:
            _set_status(client, run_id, "SCHEDULED")
        items = [Param(k, v) for k, v in (params or {}).items()]
        accepted = [RunTag(TAG.ACCEPTED_AT, now())]
        for i in range(0, max(len(items), 1), 100):  # log_batch takes at most 100 params a call
            client.log_batch(run_id, params=items[i : i + 100], tags=accepted if i == 0 else [])
    except Exception:
        # Half-created (MLflow failed between calls): delete it, so no RUNNING run without params stays behind.
        try:
            client.delete_run(run_id)
        except Exception:  # noqa: S110 - the caller reports the first failure; the reconciler finds what stays
            pass
        raise
    return run.info


def start_run(client: MlflowClient, run_id: str, tags: Mapping[str, str] | None = None, *, first: bool = True) -> None:
    """Mark the run RUNNING (``first``: a worker's first start, which stamps ``TAG.STARTED_AT``)."""
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in (tags or {}).items()]
    if first:
        items.append(RunTag(TAG.STARTED_AT, now()))
    if items:
        client.log_batch(run_id, tags=items)
    _set_status(client, run_id, "RUNNING")


def end_run(
    client: MlflowClient, run_id: str, status: str, outcome: str, reason: str, *,
    metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None, logged: Sequence[Metric] = (),
) -> None:
    """End the run with its terminal ``status`` and exactly one ``outcome`` and ``reason`` (plus final metrics/tags).

    ``logged``: metrics stamped already (the last epoch's), sent in the same request.
    """
    from mlflow.entities import Metric, RunTag

    assert status in TERMINAL_STATUSES, f"{status} is not how a run ends"
    now = _millis()
    batch = [RunTag(k, v) for k, v in (tags or {}).items()] + [RunTag(TAG.OUTCOME, outcome), RunTag(TAG.REASON, reason[:MAX_REASON])]
    client.log_batch(run_id, metrics=[*logged, *(Metric(k, float(v), now, 0) for k, v in (metrics or {}).items())], tags=batch)
    client.set_terminated(run_id, status=status)


def reopen_run(client: MlflowClient, run_id: str, tags: Mapping[str, str] | None = None) -> None:
    """Make an ended run RUNNING again, its outcome and reason removed (a study extended after it ended)."""
    from mlflow.exceptions import MlflowException

    for key in (TAG.OUTCOME, TAG.REASON):
        try:
            client.delete_tag(run_id, key)
        except MlflowException:
            pass  # absent already
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.update_run(run_id, status="RUNNING")


def now() -> str:
    """The time as the ``*_at`` tags hold it (ISO 8601, UTC)."""
    return datetime.now(timezone.utc).isoformat()


def _set_status(client: MlflowClient, run_id: str, status: str) -> None:
    """``client.update_run(run_id, status=status)`` in one request: MlflowClient reads the whole run first (for
    its end time, which a status change keeps), a second round trip on every accept."""
    try:
        mlflow_store.set_run_status(client, run_id, status)
    except CompatError:  # a client without that store: the two requests
        client.update_run(run_id, status=status)


def _millis() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)
