"""Idempotency-Key: a replay returns the original trial, another body is a 409, errors free the key."""

from __future__ import annotations

import uuid

import pytest

from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration


def _trial_runs(mlflow_client, app) -> int:
    experiment = mlflow_client.get_experiment_by_name(app.extensions["convtune"].settings.experiment)
    return 0 if experiment is None else len(mlflow_client.search_runs([experiment.experiment_id], max_results=1000))


def test_same_key_same_body_replays_the_original_trial(client, app, mlflow_client):
    key = uuid.uuid4().hex
    spec = tiny_trial(optim={"epochs": 1000}, name="idem")
    first = client.post("/trials", json=spec, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    runs = _trial_runs(mlflow_client, app)
    # the same body with its keys in another order is the same request
    reordered = dict(reversed(list(spec.items())))
    again = client.post("/trials", json=reordered, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert _trial_runs(mlflow_client, app) == runs  # no second trial
    client.post(f"/trials/{first.get_json()['id']}/cancel")


def test_same_key_different_body_is_409(client):
    key = uuid.uuid4().hex
    first = client.post("/trials", json=tiny_trial(optim={"epochs": 1000}), headers={"Idempotency-Key": key})
    assert first.status_code == 202
    response = client.post("/trials", json=tiny_trial(optim={"epochs": 999}), headers={"Idempotency-Key": key})
    assert response.status_code == 409 and response.mimetype == "application/problem+json"
    assert response.get_json()["type"].endswith("/idempotency-conflict")
    client.post(f"/trials/{first.get_json()['id']}/cancel")


def test_a_rejected_request_does_not_use_up_its_key(client):
    key = uuid.uuid4().hex
    bad = client.post("/trials", json=tiny_trial(model={"kernel_size": 4}), headers={"Idempotency-Key": key})
    assert bad.status_code == 422
    good = client.post("/trials", json=tiny_trial(optim={"epochs": 1000}), headers={"Idempotency-Key": key})
    assert good.status_code == 202
    client.post(f"/trials/{good.get_json()['id']}/cancel")


def test_a_key_is_remembered_at_least_a_day(client, app):
    key = uuid.uuid4().hex
    response = client.post("/trials", json=tiny_trial(optim={"epochs": 1000}), headers={"Idempotency-Key": key})
    trial_id = response.get_json()["id"].encode()
    redis_client = app.extensions["convtune"].redis
    [record] = [k for k in redis_client.scan_iter("convtune:idempotency:*") if trial_id in (redis_client.get(k) or b"")]
    assert redis_client.ttl(record) > 24 * 3600 - 60
    client.post(f"/trials/{response.get_json()['id']}/cancel")


def test_without_a_key_each_post_creates_a_trial(client):
    spec = tiny_trial(optim={"epochs": 1000})
    a, b = client.post("/trials", json=spec), client.post("/trials", json=spec)
    assert a.status_code == b.status_code == 202 and a.get_json()["id"] != b.get_json()["id"]
    for r in (a, b):
        client.post(f"/trials/{r.get_json()['id']}/cancel")


def test_a_retried_extend_adds_its_trials_once(client, api_settings, worker_env):
    from service.api import create_app

    studies = create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})).test_client()
    study = {"base": tiny_trial(queue="gpu"), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "n_trials": 2}
    study_id = studies.post("/studies", json=study).get_json()["id"]
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = studies.post(f"/studies/{study_id}/extend", json={"n_trials": 3}, headers=key)
    again = studies.post(f"/studies/{study_id}/extend", json={"n_trials": 3}, headers=key)
    assert first.status_code == again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert studies.get(f"/studies/{study_id}").get_json()["progress"]["n_trials"] == 5
    studies.post(f"/studies/{study_id}/cancel")
