"""413 for big bodies, 429 with Retry-After for rate limits and quotas (shared in Redis), and /metrics."""

from __future__ import annotations

import uuid

import pytest

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration


def _secured(api_settings: ApiSettings, **limits) -> tuple[object, dict[str, str]]:
    name = f"ci-{uuid.uuid4().hex[:6]}"  # a fresh token name: fresh counters in Redis
    secret = f"ct_{uuid.uuid4().hex}"
    settings = api_settings.model_copy(update={
        "auth_disabled": False, "auth_tokens": [TokenConfig(name=name, sha256=hash_token(secret), scopes=["read", "submit"])], **limits,
    })
    return create_app(settings), {"Authorization": f"Bearer {secret}"}


def test_body_over_the_limit_is_413_problem(api_settings):
    app, headers = _secured(api_settings, max_body_bytes=2048)
    spec = tiny_trial(tags={f"k{i}": "x" * 400 for i in range(10)})
    response = app.test_client().post("/trials", json=spec, headers=headers)
    assert response.status_code == 413 and response.mimetype == "application/problem+json"
    assert response.get_json()["type"].endswith("/payload-too-large")


def test_rate_limit_is_per_token_shared_by_processes_and_says_when_to_retry(api_settings):
    app, headers = _secured(api_settings, rate_limit="5/minute")
    # Two app instances stand for two gunicorn processes: they share the counter in Redis.
    twin = create_app(app.extensions["convtune"].settings)
    clients = [app.test_client(), twin.test_client()]
    answers = [clients[i % 2].get("/trials?limit=1", headers=headers) for i in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    limited = clients[1].get("/trials?limit=1", headers=headers)
    assert limited.status_code == 429 and limited.mimetype == "application/problem+json"
    assert limited.get_json()["type"].endswith("/too-many-requests")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # probes are exempt
    assert clients[0].get("/healthz").status_code == 200


def test_submit_rate_limit_applies_to_posts_only(api_settings):
    app, headers = _secured(api_settings, submit_rate_limit="2/minute")
    client = app.test_client()
    bad = {"model": {"kernel_size": 4}}  # rejected by validation: counted, creates nothing
    assert [client.post("/trials", json=bad, headers=headers).status_code for _ in range(2)] == [422, 422]
    assert client.post("/trials", json=bad, headers=headers).status_code == 429
    assert client.get("/trials?limit=1", headers=headers).status_code == 200


def test_queued_trials_per_token_are_capped_with_429(api_settings):
    app, headers = _secured(api_settings, max_queued_trials_per_token=2)
    client = app.test_client()
    # queue "gpu" has no worker in the tests: these stay queued
    ids = [client.post("/trials", json=tiny_trial(queue="gpu"), headers=headers).get_json()["id"] for _ in range(2)]
    third = client.post("/trials", json=tiny_trial(queue="gpu"), headers=headers)
    assert third.status_code == 429 and "queued" in third.get_json()["detail"]
    assert int(third.headers["Retry-After"]) > 0
    client.post(f"/trials/{ids[0]}/cancel", headers=headers)
    fourth = client.post("/trials", json=tiny_trial(queue="gpu"), headers=headers)
    assert fourth.status_code == 202
    for trial_id in (ids[1], fourth.get_json()["id"]):
        client.post(f"/trials/{trial_id}/cancel", headers=headers)


def test_the_queue_is_counted_in_mlflow_only_near_the_cap(api_settings, monkeypatch):
    """Issue 10: counting a token's queued work read every queued run from MLflow on every submit."""
    app, headers = _secured(api_settings, max_queued_trials_per_token=4)
    s = app.extensions["convtune"]
    owner = s.settings.auth_tokens[0].name
    searches = []
    counted = s.runs.queued_runs
    monkeypatch.setattr(s.runs, "queued_runs", lambda *a: searches.append(a) or counted(*a))
    client = app.test_client()
    post = lambda: client.post("/trials", json=tiny_trial(queue="gpu"), headers=headers)  # noqa: E731 - no worker serves "gpu"
    ids = [post().get_json()["id"] for _ in range(3)]
    assert len(searches) == 1  # the first submit: no index yet
    client.post(f"/trials/{ids[0]}/cancel", headers=headers)
    ids.append(post().get_json()["id"])  # the index says 3 (one ended since): still below the cap, no search
    assert len(searches) == 1
    ids.append(post().get_json()["id"])  # the index says 4: counted in MLflow (3 queued), accepted, the index rebuilt
    assert len(searches) == 2 and s.redis.scard(f"convtune:queued:{owner}") == 1 + 4
    refused = post()
    assert refused.status_code == 429 and "already has 4 queued" in refused.get_json()["detail"] and len(searches) == 3
    s.redis.delete(f"convtune:queued:{owner}")  # Redis lost it: counted again, not trusted as zero
    assert post().status_code == 429 and len(searches) == 4
    for trial_id in ids[1:]:
        client.post(f"/trials/{trial_id}/cancel", headers=headers)


def test_epochs_over_the_cap_is_422_naming_the_field(api_settings):
    app, headers = _secured(api_settings, max_epochs=5)
    response = app.test_client().post("/trials", json=tiny_trial(optim={"epochs": 6}), headers=headers)
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "optim.epochs"


def test_metrics_count_requests_by_route_and_status_and_read_queues(client, app):
    client.get("/trials/0123456789abcdef0123456789abcdef")
    text = client.get("/metrics").get_data(as_text=True)
    # prometheus-flask-exporter's histogram, by URL rule and status; its _count is the requests answered
    assert 'convtune_http_request_duration_seconds_count{method="GET",route="/trials/<trial_id>",status="404"}' in text
    assert "convtune_http_request_duration_seconds_bucket" in text
    assert 'convtune_http_request_total{method="GET",status="404"}' in text
    for queue in ("gpu", "cpu", "callbacks"):
        assert f'convtune_queue_depth{{queue="{queue}"}}' in text
        assert f'convtune_workers{{queue="{queue}"}}' in text


def test_study_caps_on_trials_and_parallelism_are_422_naming_the_fields(api_settings):
    app, headers = _secured(api_settings, max_trials_per_study=10, max_parallelism=2)
    client = app.test_client()
    study = {"base": tiny_trial(), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "n_trials": 11, "parallelism": 3}
    response = client.post("/studies", json=study, headers=headers)
    assert response.status_code == 422, response.get_json()
    assert {e["field"] for e in response.get_json()["errors"]} == {"n_trials", "parallelism"}
    assert "at most 10 trials" in response.get_json()["detail"]
