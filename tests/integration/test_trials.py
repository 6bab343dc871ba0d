"""POST a trial -> a real worker trains it -> MLflow holds everything; and every way that can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api import create_app
from tests.helpers import tiny_trial, wait_for_trial, write_npz

pytestmark = pytest.mark.integration

METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second")


def _runs(mlflow_client, app) -> list:
    experiment = mlflow_client.get_experiment_by_name(app.extensions["convtune"].settings.experiment)
    return [] if experiment is None else mlflow_client.search_runs([experiment.experiment_id], max_results=1000)


def test_trial_trains_to_success_and_mlflow_holds_it(client, worker, mlflow_client, mlflow_uri):
    response = client.post("/trials", json=tiny_trial(optim={"epochs": 3}, name="slice", tags={"team": "vision"}))
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()
    assert response.headers["Location"].endswith(f"/trials/{accepted['id']}")
    assert accepted["status"] == "queued" and accepted["queue"] == "cpu"
    assert accepted["params_count"] > 0 and accepted["flops_per_sample"] > 0
    assert f"/runs/{accepted['id']}" in accepted["mlflow_url"] and "#/experiments/" in accepted["mlflow_url"]

    trial = wait_for_trial(client, accepted["id"])
    assert trial["status"] == "succeeded", trial["reason"]
    assert trial["outcome"] == "succeeded" and trial["epochs_done"] == 3 == trial["epochs"]
    assert set(METRICS) <= set(trial["metrics"])
    assert trial["best"]["val_accuracy"]["epoch"] in (1, 2, 3)
    assert trial["timings"]["started_at"] and trial["timings"]["run_seconds"] > 0

    run = mlflow_client.get_run(accepted["id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.channels"] == "[8, 16]"
    assert run.data.tags["mlflow.runName"] == "slice" and run.data.tags["user.team"] == "vision"
    for key in METRICS:
        history = mlflow_client.get_metric_history(accepted["id"], key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    artifacts = {a.path for a in mlflow_client.list_artifacts(accepted["id"])}
    assert {"history.json", "model_summary.json", "plots"} <= artifacts
    plots = {a.path for a in mlflow_client.list_artifacts(accepted["id"], "plots")}
    assert {"plots/learning_curve.svg", "plots/confusion_matrix.svg"} <= plots
    # The summary is a table as MlflowClient.log_table writes it, and MLflow's UI knows it as one.
    with open(mlflow_client.download_artifacts(accepted["id"], "model_summary.json")) as f:
        table = json.load(f)
    assert table["columns"][:2] and len(table["data"]) >= 2 and all(len(row) == len(table["columns"]) for row in table["data"])
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "model_summary.json", "type": "table"}]
    assert run.data.tags["convtune.device"] == "cpu" and run.data.tags["convtune.attempts"] == "1"
    history = json.loads(open(mlflow_client.download_artifacts(accepted["id"], "history.json")).read())
    assert [round(h["val_accuracy"], 6) for h in history] == [round(m.value, 6) for m in sorted(mlflow_client.get_metric_history(accepted["id"], "val_accuracy"), key=lambda m: m.step)]

    import mlflow.pytorch
    import torch

    model = mlflow.pytorch.load_model(f"runs:/{accepted['id']}/model")
    logits = model(torch.zeros(2, 1, 8, 8))
    assert logits.shape == (2, 10)


def test_invalid_spec_is_422_with_field_paths_and_creates_nothing(client, app, mlflow_client):
    before = len(_runs(mlflow_client, app))
    response = client.post("/trials", json={"model": {"kernel_size": 4, "bogus": 1}, "optim": {"lr": 0, "optimizer": "adam", "momentum": 0.9}})
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    fields = {e["field"] for e in problem["errors"]}
    assert {"model.kernel_size", "model.bogus", "optim.lr"} <= fields
    assert problem["type"].endswith("/invalid-spec") and problem["detail"]
    assert len(_runs(mlflow_client, app)) == before


def test_infeasible_architecture_is_422_naming_layer_and_sizes(client, app, mlflow_client):
    before = len(_runs(mlflow_client, app))
    response = client.post("/trials", json=tiny_trial(model={"channels": [8, 8, 8, 8, 8], "kernel_size": 1, "downsample": "maxpool"}))
    assert response.status_code == 422
    problem = response.get_json()
    assert problem["type"].endswith("/infeasible-spec")
    assert "features.stage" in problem["detail"] and "1x1" in problem["detail"]
    assert problem["errors"][0]["field"].startswith("model.")
    assert len(_runs(mlflow_client, app)) == before


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("{not json", "application/json", 400), ("lr=1", "application/x-www-form-urlencoded", 415), ("[1, 2]", "application/json", 422),
        ("[" * 200_000, "application/json", 400),  # nested past Python's recursion limit
    ],
)
def test_unreadable_bodies_are_problems_not_500(client, body, content_type, status):
    response = client.post("/trials", data=body, content_type=content_type)
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["detail"]


def test_oversized_body_is_413(client, app):
    limit = app.extensions["convtune"].settings.max_body_bytes
    response = client.post("/trials", data='{"name": "' + "x" * limit + '"}', content_type="application/json")
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"


def test_unknown_trial_and_route_are_404_problems(client):
    for path in ("/trials/0123456789abcdef0123456789abcdef", "/trials/not-a-run-id", "/nowhere"):
        response = client.get(path)
        assert response.status_code == 404 and response.mimetype == "application/problem+json", path


def test_redis_unreachable_is_503_and_leaves_no_trial_queued(api_settings, mlflow_client):
    broken = create_app(api_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    client = broken.test_client()
    before = {r.info.run_id for r in _runs(mlflow_client, broken)}
    response = client.post("/trials", json=tiny_trial())
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert "Redis" in response.get_json()["detail"] and response.headers["Retry-After"]
    # Refused before anything was recorded (the queued-work count needs Redis too): no run, queued or not.
    # A run recorded before a send that fails is ended failed: test_faults_api covers that order.
    assert {r.info.run_id for r in _runs(mlflow_client, broken)} == before
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_mlflow_unreachable_is_503(api_settings):
    client = create_app(api_settings.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:1", "experiment": "unreachable"})).test_client()
    response = client.post("/trials", json=tiny_trial())
    assert response.status_code == 503 and response.mimetype == "application/problem+json"
    assert client.get("/readyz").get_json()["checks"]["mlflow"] != "ok"


def test_training_error_is_a_failed_trial_with_its_reason(client, worker, data_root):
    # The API cannot see the data root here, so the bad file is only found by the worker.
    write_npz(data_root, "bad.npz", images=np.zeros((20, 8, 8), np.float32), labels=np.zeros(7, np.int64))
    accepted = client.post("/trials", json=tiny_trial(data={"name": "npz", "path": "bad.npz"})).get_json()
    assert accepted["params_count"] is None  # sized by the worker, not the API
    trial = wait_for_trial(client, accepted["id"])
    assert trial["status"] == "failed" and trial["outcome"] == "invalid_data"
    assert "bad.npz" in trial["reason"]


def test_user_npz_is_checked_at_submit_when_the_api_sees_the_root(api_settings, data_root, worker):
    client = create_app(api_settings.model_copy(update={"data_root": data_root})).test_client()
    write_npz(data_root, "mismatch.npz", images=np.zeros((20, 8, 8), np.float32), labels=np.zeros(7, np.int64))
    response = client.post("/trials", json=tiny_trial(data={"name": "npz", "path": "mismatch.npz"}))
    assert response.status_code == 422 and response.get_json()["errors"][0]["field"] == "data.path"
    response = client.post("/trials", json=tiny_trial(data={"name": "npz", "path": "../../etc/passwd"}))
    assert response.status_code == 422 and response.get_json()["errors"][0]["field"] == "data.path"

    rng = np.random.default_rng(0)
    write_npz(data_root, "good.npz", images=rng.normal(size=(120, 12, 12, 3)).astype(np.float32), labels=rng.integers(0, 3, 120))
    accepted = client.post("/trials", json=tiny_trial(data={"name": "npz", "path": "good.npz"}))
    assert accepted.status_code == 202 and accepted.get_json()["params_count"] > 0
    assert wait_for_trial(client, accepted.get_json()["id"])["status"] == "succeeded"


def test_cancel_running_and_queued_trials(client, worker):
    long = tiny_trial(optim={"epochs": 200}, data={"name": "shapes", "num_samples": 2000}, model={"channels": [16, 32]})
    running = client.post("/trials", json=long).get_json()
    queued = client.post("/trials", json=long).get_json()  # one worker: this one waits
    wait_for_trial(client, running["id"], until=lambda t: t["status"] == "running")

    response = client.post(f"/trials/{queued['id']}/cancel")
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    response = client.post(f"/trials/{running['id']}/cancel")
    assert response.status_code == 202

    trial = wait_for_trial(client, running["id"], timeout_s=60)
    assert trial["status"] == "cancelled" and trial["outcome"] == "cancelled"
    assert "cancelled on request" in trial["reason"] and trial["epochs_done"] < 200
    assert client.get(f"/trials/{queued['id']}").get_json()["status"] == "cancelled"
    again = client.post(f"/trials/{running['id']}/cancel")
    assert again.status_code == 409 and again.mimetype == "application/problem+json"


def test_list_is_newest_first_paginated_and_filtered(client, worker):
    ids = [client.post("/trials", json=tiny_trial(optim={"epochs": 1})).get_json()["id"] for _ in range(3)]
    for trial_id in ids:
        wait_for_trial(client, trial_id)
    first = client.get("/trials?limit=2").get_json()
    assert [t["id"] for t in first["items"]] == ids[::-1][:2]
    assert first["next_page_token"]
    second = client.get(f"/trials?limit=2&page_token={first['next_page_token']}").get_json()
    assert second["items"][0]["id"] == ids[0]
    succeeded = client.get("/trials?status=succeeded&limit=200").get_json()["items"]
    assert {t["status"] for t in succeeded} == {"succeeded"} and set(ids) <= {t["id"] for t in succeeded}
    assert client.get("/trials?status=bogus").status_code == 422
    assert client.get("/trials?limit=0").status_code == 422


def test_ready_when_redis_and_mlflow_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json()["checks"] == {"redis": "ok", "mlflow": "ok"}


def test_a_network_over_the_parameter_cap_is_refused(api_settings):
    client = create_app(api_settings.model_copy(update={"max_params": 10_000})).test_client()
    response = client.post("/trials", json=tiny_trial(model={"channels": [64, 128]}))
    assert response.status_code == 422
    assert "at most 10,000" in response.get_json()["detail"] and response.get_json()["errors"][0]["field"] == "model.channels"


def test_callback_hosts_are_limited_when_the_service_lists_them(api_settings):
    client = create_app(api_settings.model_copy(update={"callback_hosts": ["hooks.example.com", "*.ci.example.com"]})).test_client()
    refused = client.post("/trials", json=tiny_trial(callback_url="http://169.254.169.254/latest/meta-data"))
    assert refused.status_code == 422
    assert refused.get_json()["errors"][0]["field"] == "callback_url" and "169.254.169.254" in refused.get_json()["detail"]
    for url in ("https://hooks.example.com/convtune", "https://build-7.ci.example.com/hook"):
        response = client.post("/trials", json=tiny_trial(callback_url=url, queue="gpu"))  # no worker on gpu: stays queued
        assert response.status_code == 202, response.get_json()
        client.post(f"/trials/{response.get_json()['id']}/cancel")
    study = client.post("/studies", json={"base": tiny_trial(callback_url="http://10.0.0.1/x"), "search_space": {"model.activation": ["relu"]}, "n_trials": 1})
    assert study.status_code == 422 and study.get_json()["errors"][0]["field"] == "base.callback_url"


def test_a_spec_too_long_for_a_tag_is_kept_in_an_artifact_and_read_back_everywhere(client, worker, mlflow_client):
    # Twenty user tags of 500 characters: a valid spec of about 11,000 characters, over MLflow's 8,000 a tag
    # (a column of that size on Postgres; this sqlite server would not say).
    from models.store.runs import SPEC_ARTIFACT, SPEC_TAG_LIMIT, TAG, run_spec, with_spec

    tags = {f"note{i}": chr(ord("a") + i) * 500 for i in range(20)}
    response = client.post("/trials", json=tiny_trial(optim={"epochs": 2}, tags=tags))
    assert response.status_code == 202, response.get_json()
    trial_id = response.get_json()["id"]
    run = mlflow_client.get_run(trial_id)
    assert TAG.SPEC not in run.data.tags and run.data.tags[TAG.SPEC_IN] == SPEC_ARTIFACT
    assert all(len(value) <= SPEC_TAG_LIMIT for value in run.data.tags.values())
    # What the API shows, and what the reconciler would send again, is the whole spec.
    assert client.get(f"/trials/{trial_id}").get_json()["spec"]["tags"] == tags
    assert run_spec(with_spec(mlflow_client, trial_id, run.data.tags), None)["tags"] == tags
    assert wait_for_trial(client, trial_id)["status"] == "succeeded"
