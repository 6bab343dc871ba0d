"""POST a study -> real workers run its trials through Optuna -> MLflow holds the parent and its children.

Two real Celery worker processes share a journal-file study storage; one more runs a study stored in
Postgres. The studies are small (tiny nets on digits, 2-3 epochs) so the file runs in about a minute.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import optuna
import pytest

from models.store.search import open_storage
from service.api import create_app
from tests.conftest import Service, start_worker
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

POSTGRES_URL = os.environ.get("CONVTUNE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def study_settings(api_settings, worker_env):
    return api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})


@pytest.fixture(scope="module")
def studies(study_settings):
    return create_app(study_settings).test_client()


@pytest.fixture(scope="module")
def study_workers(worker_env) -> Iterator[list[Service]]:
    """Two worker processes on the cpu queue, so parallelism=2 really runs two trials at once."""
    workers = [start_worker(f"study-worker{i}", worker_env) for i in range(2)]
    yield workers
    for w in workers:
        w.stop()


def study_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "base": tiny_trial(optim={"epochs": 3}),
        "search_space": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}, "model.activation": ["relu", "gelu"]},
        "sampler": {"name": "tpe", "n_startup_trials": 4},
        "pruner": "none",
        "n_trials": 4,
        "parallelism": 2,
    }
    body.update(overrides)
    return body


def submit(client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/studies", json=body)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def wait_for_study(client, study_id: str, until=None, timeout_s: float = 180) -> dict[str, Any]:
    until = until or (lambda s: s["state"] in ("succeeded", "failed", "cancelled"))
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/studies/{study_id}")
        assert response.status_code == 200, response.get_json()
        study = response.get_json()
        if until(study):
            return study
        assert time.monotonic() < deadline, f"study {study_id} stuck: {study['state']} {study['counts']} {study['progress']}"
        time.sleep(0.5)


def trials_of(client, study_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/studies/{study_id}/trials")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def children(mlflow_client, study_id: str) -> list:
    parent = mlflow_client.get_run(study_id)
    return mlflow_client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_id}'", max_results=1000)


def test_study_prunes_bad_trials_and_mlflow_holds_parent_children_and_results(studies, study_workers, mlflow_client):
    model_name = f"digits-{uuid.uuid4().hex[:6]}"
    # Two good configurations first, then two hopeless ones the median pruner must stop after one epoch.
    body = study_body(
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}, n_trials=5, register_as=model_name,
        warm_start=[
            {"optim.lr": 3e-3, "model.activation": "relu"}, {"optim.lr": 5e-3, "model.activation": "gelu"},
            {"optim.lr": 1e-5, "model.activation": "relu"}, {"optim.lr": 1.2e-5, "model.activation": "gelu"},
        ],
    )
    accepted = submit(studies, body)
    assert accepted["state"] == "queued" and accepted["n_trials"] == 5 and accepted["storage"] == "journal"
    assert f"/runs/{accepted['id']}" in accepted["mlflow_url"] and "#/experiments/" in accepted["mlflow_url"]
    parent = mlflow_client.get_run(accepted["id"])  # durable before the 202
    assert parent.data.tags["convtune.kind"] == "study" and parent.data.params["study.pruner"] == "median"

    study = wait_for_study(studies, accepted["id"])
    assert study["state"] == "succeeded", study["reason"]
    assert study["progress"]["finished"] == 5 and study["progress"]["fraction"] == 1.0
    assert sum(study["counts"].values()) == 5 and study["counts"].get("pruned", 0) >= 1, study["counts"]
    assert study["best"]["value"] > 0.8 and study["best"]["params"]["optim.lr"] >= 3e-3

    trials = trials_of(studies, accepted["id"])
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4]
    pruned = [t for t in trials if t["outcome"] == "pruned"]
    assert pruned and all(t["state"] == "pruned" and 1 <= t["epochs"] < 3 for t in pruned)
    assert all(t["params"]["optim.lr"] < 1e-4 for t in pruned)
    assert "after epoch" in pruned[0]["reason"]

    runs = {r.info.run_id: r for r in children(mlflow_client, accepted["id"])}
    assert set(runs) == {t["trial_id"] for t in trials}
    for t in trials:
        run = runs[t["trial_id"]]
        assert run.data.tags["convtune.study_id"] == accepted["id"] and run.data.tags["convtune.kind"] == "trial"
        assert run.data.tags["convtune.owner"] == "anonymous"  # the study's owner owns its trials (auth is off here)
        assert run.data.tags["mlflow.runName"].startswith("lr=") and f"#{t['number']}" in run.data.tags["mlflow.runName"]
        assert run.data.params["model.activation"] == t["params"]["model.activation"]
        assert run.data.tags["convtune.outcome"] == t["outcome"]
        assert run.data.tags["convtune.epochs_done"] == str(t["epochs"])
        if t["outcome"] == "pruned":
            assert run.info.status == "FINISHED"
            assert len(mlflow_client.get_metric_history(run.info.run_id, "val_accuracy")) == t["epochs"]

    parent = mlflow_client.get_run(accepted["id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study["best"]["value"])
    assert parent.data.params["best.model.activation"] == study["best"]["params"]["model.activation"]
    assert parent.data.metrics["epochs_trained"] == sum(t["epochs"] for t in trials)
    plots = {a.path for a in mlflow_client.list_artifacts(accepted["id"], "plots")}
    assert {"plots/optimization_history.svg", "plots/param_importances.svg", "plots/parallel_coordinate.svg", "plots/intermediate_values.svg"} <= plots
    assert {"study/trials.json", "study/best.json", "study/param_importances.json"} <= {a.path for a in mlflow_client.list_artifacts(accepted["id"], "study")}

    version = mlflow_client.get_model_version_by_alias(model_name, "candidate")
    assert version.run_id == study["best"]["trial_id"]
    assert study["registered_model"] == {"name": model_name, "version": version.version, "alias": "candidate"}


def test_grid_is_enqueued_whole_and_an_extension_reuses_a_duplicate(studies, study_workers, study_settings):
    body = study_body(
        search_space={"optim.batch_size": [32, 64], "model.activation": ["relu", "gelu"]}, sampler="grid", n_trials=None,
        base=tiny_trial(optim={"epochs": 2}),
    )
    accepted = submit(studies, body)
    assert accepted["n_trials"] == 4
    stored = optuna.load_study(study_name=accepted["id"], storage=open_storage(study_settings.study_storage))
    assert len(stored.get_trials(deepcopy=False)) >= 4  # every point was enqueued before the 202

    study = wait_for_study(studies, accepted["id"])
    assert study["state"] == "succeeded", study["reason"]
    trials = trials_of(studies, accepted["id"])
    points = {(t["params"]["optim.batch_size"], t["params"]["model.activation"]) for t in trials}
    assert points == {(32, "relu"), (32, "gelu"), (64, "relu"), (64, "gelu")} and len(trials) == 4

    # The grid is done: any further trial repeats a point, whose result is reused, not retrained.
    response = studies.post(f"/studies/{accepted['id']}/extend", json={"n_trials": 1})
    assert response.status_code == 422  # a grid has no point left
    body = {"warm_start": [{"optim.batch_size": 32, "model.activation": "relu"}], "n_trials": 1}
    response = studies.post(f"/studies/{accepted['id']}/extend", json=body)
    assert response.status_code == 202, response.get_json()
    study = wait_for_study(studies, accepted["id"], until=lambda s: s["progress"]["finished"] == 5 and s["state"] == "succeeded")
    extra = trials_of(studies, accepted["id"])[-1]
    twin = next(t for t in trials if (t["params"]["optim.batch_size"], t["params"]["model.activation"]) == (extra["params"]["optim.batch_size"], extra["params"]["model.activation"]))
    assert extra["outcome"] == "duplicate" and extra["epochs"] == 0
    assert extra["duplicate_of"] == twin["number"] and extra["value"] == twin["value"]


def test_a_running_study_extended_runs_the_added_trials_within_its_parallelism(studies, study_workers):
    # Trials long enough (about a second an epoch's worth on a loaded machine) that a poll sees the first one running.
    body = study_body(n_trials=2, parallelism=1, sampler="random", base=tiny_trial(optim={"epochs": 12}))
    accepted = submit(studies, body)
    wait_for_study(studies, accepted["id"], until=lambda s: s["counts"].get("running", 0) == 1, timeout_s=60)
    response = studies.post(f"/studies/{accepted['id']}/extend", json={"n_trials": 2})
    assert response.status_code == 202 and response.get_json()["progress"]["n_trials"] == 4
    study = wait_for_study(studies, accepted["id"])
    assert study["state"] == "succeeded" and study["progress"]["finished"] == 4
    from datetime import datetime

    trials = trials_of(studies, accepted["id"])
    assert len(trials) == 4 and all(t["outcome"] == "succeeded" for t in trials)
    # parallelism 1, also after the extension: each trial started once the one before it had ended
    spans = [(datetime.fromisoformat(t["started_at"]).timestamp(), t["duration_s"]) for t in trials]
    for (start, duration), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= start + duration


def test_cancel_stops_running_and_queued_trials(studies, study_workers, mlflow_client):
    body = study_body(base=tiny_trial(optim={"epochs": 200}), n_trials=8, sampler="random")
    accepted = submit(studies, body)
    wait_for_study(studies, accepted["id"], until=lambda s: s["counts"].get("running", 0) >= 1, timeout_s=60)
    response = studies.post(f"/studies/{accepted['id']}/cancel")
    assert response.status_code == 202 and response.get_json()["state"] in ("cancelling", "cancelled")
    study = wait_for_study(studies, accepted["id"], timeout_s=90)
    assert study["state"] == "cancelled"
    trials = trials_of(studies, accepted["id"])
    assert 1 <= len(trials) <= 3 and all(t["outcome"] == "cancelled" for t in trials)
    assert all(mlflow_client.get_run(t["trial_id"]).info.status == "KILLED" for t in trials)
    assert mlflow_client.get_run(accepted["id"]).info.status == "KILLED"
    assert studies.post(f"/studies/{accepted['id']}/cancel").status_code == 409
    assert studies.post(f"/studies/{accepted['id']}/extend", json={"n_trials": 2}).status_code == 409


def test_target_stops_the_study_early(studies, study_workers):
    body = study_body(n_trials=6, parallelism=1, target=0.0, sampler="random", base=tiny_trial(optim={"epochs": 1}))
    study = wait_for_study(studies, submit(studies, body)["id"])
    assert study["state"] == "succeeded" and study["progress"]["stopped"] == "target"
    assert study["progress"]["finished"] == 1 and "target" in study["reason"]


def test_timeout_starts_no_trial_past_it(studies, study_workers):
    body = study_body(n_trials=20, parallelism=1, sampler="random", timeout_s=3, base=tiny_trial(optim={"epochs": 4}))
    study = wait_for_study(studies, submit(studies, body)["id"])
    assert study["state"] == "succeeded" and study["progress"]["stopped"] == "timeout"
    assert 1 <= study["progress"]["finished"] < 20 and "timeout" in study["reason"]


def test_studies_are_listed_newest_first_and_trials_filter_by_state(studies, study_workers):
    first = submit(studies, study_body(n_trials=1, parallelism=1, sampler="random", base=tiny_trial(optim={"epochs": 1})))["id"]
    second = submit(studies, study_body(n_trials=2, parallelism=1, sampler="random", base=tiny_trial(optim={"epochs": 1})))["id"]
    listed = studies.get("/studies", query_string={"limit": 2}).get_json()
    assert [s["id"] for s in listed["items"]] == [second, first] and listed["next_page_token"]
    wait_for_study(studies, second)
    complete = studies.get(f"/studies/{second}/trials", query_string={"state": "complete"}).get_json()
    assert complete["total"] == 2 and all(t["state"] == "complete" for t in complete["items"])
    assert studies.get(f"/studies/{second}/trials", query_string={"state": "pruned"}).get_json()["total"] == 0


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        pytest.param({"search_space": {"optim.lrr": [1e-3]}}, "search_space.optim.lrr", "no field 'lrr'", id="unknown-path"),
        pytest.param({"search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 20}}}, "search_space.optim.lr.high", "less than or equal to 10", id="out-of-bounds"),
        pytest.param({"search_space": {"model.kernel_size": [3, 11]}}, "search_space.model.kernel_size", "larger than its 8x8 input", id="never-feasible"),
        pytest.param({"search_space": {"optim.momentum": {"type": "float", "low": 0.5, "high": 0.9}}}, "search_space.optim.momentum.low", "momentum applies to", id="unconditional-momentum"),
        pytest.param({"search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "sampler": "grid"}, "search_space.optim.lr", "grid needs", id="continuous-grid"),
    ],
)
def test_invalid_study_is_422_naming_the_field_and_creates_nothing(studies, mlflow_client, study_settings, body, field, fragment):
    experiment = mlflow_client.get_experiment_by_name(study_settings.experiment)
    before = len(mlflow_client.search_runs([experiment.experiment_id], max_results=1000)) if experiment else 0
    response = studies.post("/studies", json={**study_body(), **body})
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert response.mimetype == "application/problem+json"
    match = [e for e in problem["errors"] if e["field"] == field]
    assert match and fragment in match[0]["message"], problem["errors"]
    after = len(mlflow_client.search_runs([experiment.experiment_id], max_results=1000)) if experiment else 0
    assert after == before


def test_an_unreachable_study_storage_is_503_and_the_parent_run_is_failed(api_settings, mlflow_client):
    client = create_app(api_settings.model_copy(update={"study_storage": "postgresql://postgres@127.0.0.1:9/nowhere"})).test_client()
    response = client.post("/studies", json=study_body())
    assert response.status_code == 503, response.get_json()
    assert response.headers["Retry-After"] and "study storage (postgresql)" in response.get_json()["detail"]
    experiment = mlflow_client.get_experiment_by_name(api_settings.experiment)
    failed = mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`convtune.kind` = 'study' and attributes.status = 'FAILED'")
    assert failed and failed[0].data.tags["convtune.reason"].startswith("not dispatched")


def test_unknown_study_is_404(studies):
    assert studies.get("/studies/" + "0" * 32).status_code == 404
    assert studies.get("/studies/not-an-id/trials").status_code == 404


@pytest.fixture(scope="module")
def postgres_storage() -> str:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Postgres is not reachable at {POSTGRES_URL} ({exc}); start it, or set CONVTUNE_TEST_POSTGRES_URL")
    return POSTGRES_URL


def test_a_study_stored_in_postgres_runs_on_workers_sharing_it(api_settings, worker_env, postgres_storage):
    # Its own queue, so only the worker configured with the Postgres storage takes its steps.
    worker = start_worker("study-pg-worker", {**worker_env, "CONVTUNE_STUDY_STORAGE": postgres_storage}, queue="gpu")
    try:
        client = create_app(api_settings.model_copy(update={"study_storage": postgres_storage})).test_client()
        accepted = submit(client, study_body(n_trials=2, parallelism=1, sampler="random", base=tiny_trial(optim={"epochs": 1}, queue="gpu")))
        assert accepted["storage"] == "postgresql" and accepted["queue"] == "gpu"
        study = wait_for_study(client, accepted["id"])
        assert study["state"] == "succeeded", study["reason"]
        assert study["progress"]["finished"] == 2
        stored = optuna.load_study(study_name=accepted["id"], storage=open_storage(postgres_storage))
        assert [t.state.name for t in stored.get_trials()] == ["COMPLETE", "COMPLETE"]
    finally:
        worker.stop()


def test_a_study_trial_whose_worker_dies_resumes_from_its_checkpoint(studies, study_workers, worker, mlflow_client):
    import signal
    import subprocess

    body = study_body(n_trials=2, parallelism=1, sampler="random", base=tiny_trial(optim={"epochs": 30, "batch_size": 16}))
    accepted = submit(studies, body)
    first = wait_for_study(studies, accepted["id"], until=lambda s: s["counts"].get("running", 0) == 1, timeout_s=60)
    assert first["state"] == "running"
    deadline = time.monotonic() + 60
    while (trial_id := trials_of(studies, accepted["id"])[0]["trial_id"]) is None:  # sampled, its run not created yet
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while int(mlflow_client.get_run(trial_id).data.tags.get("convtune.epochs_done", 0)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # The training process dies mid-epoch, as on an OOM kill (idle pools just restart). Every worker on
    # the cpu queue, the session's own included: any of them may have taken the step.
    for each in [*study_workers, worker]:
        for pid in subprocess.run(["pgrep", "-P", str(each.popen.pid)], capture_output=True, text=True, check=False).stdout.split():
            os.kill(int(pid), signal.SIGKILL)

    study = wait_for_study(studies, accepted["id"], timeout_s=240)
    assert study["state"] == "succeeded", study["reason"]
    trials = trials_of(studies, accepted["id"])
    assert len(trials) == 2 and trials[0]["trial_id"] == trial_id and trials[0]["outcome"] == "succeeded"
    run = mlflow_client.get_run(trial_id)
    assert run.data.tags["convtune.attempts"] == "2"
    assert {m.step for m in mlflow_client.get_metric_history(trial_id, "val_accuracy")} == set(range(1, 31))
    assert any("resuming it" in w.log() for w in [*study_workers, worker])
