"""Bearer tokens and scopes against the real app (real Redis and mlflow server behind it)."""

from __future__ import annotations

import logging
import uuid

import pytest

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

TOKENS = {"reader": ["read"], "submitter": ["read", "submit"], "other": ["read", "submit"], "root": ["admin"]}
SECRETS = {name: f"ct_test_{name}_{uuid.uuid4().hex}" for name in TOKENS}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture(scope="module")
def secured_app(api_settings: ApiSettings):
    tokens = [TokenConfig(name=name, sha256=hash_token(SECRETS[name]), scopes=scopes) for name, scopes in TOKENS.items()]
    return create_app(api_settings.model_copy(update={"auth_disabled": False, "auth_tokens": tokens}))


@pytest.fixture()
def api(secured_app):
    return secured_app.test_client()


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.get_json()
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["type"].endswith(f"/{slug}") and problem["status"] == status and problem["detail"]
    return problem


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer not-a-token"}])
def test_missing_or_unknown_token_is_401_problem_with_challenge(api, headers):
    response = api.get("/trials", headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_scopes_decide_what_a_token_may_call(api):
    assert api.get("/trials", headers=bearer("reader")).status_code == 200
    problem = assert_problem(api.post("/trials", json=tiny_trial(), headers=bearer("reader")), 403, "forbidden")
    assert "submit" in problem["detail"]
    accepted = api.post("/trials", json=tiny_trial(optim={"epochs": 1000}), headers=bearer("submitter"))
    assert accepted.status_code == 202, accepted.get_json()
    trial_id = accepted.get_json()["id"]
    # admin implies read and submit
    assert api.get(f"/trials/{trial_id}", headers=bearer("root")).status_code == 200

    # only the submitter or an admin may cancel it
    assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("other")), 403, "forbidden")
    assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("reader")), 403, "forbidden")
    cancelled = api.post(f"/trials/{trial_id}/cancel", headers=bearer("root"))
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"


def test_owner_is_recorded_on_the_run_and_in_the_access_log(api, mlflow_client, caplog):
    with caplog.at_level(logging.INFO, logger="convtune.access"):
        accepted = api.post("/trials", json=tiny_trial(optim={"epochs": 1000}), headers=bearer("submitter"))
    trial_id = accepted.get_json()["id"]
    assert mlflow_client.get_run(trial_id).data.tags["convtune.owner"] == "submitter"
    [line] = [r for r in caplog.records if r.name == "convtune.access" and getattr(r, "route", None) == "/trials"]
    assert (line.trial_id, line.principal, line.status, line.method) == (trial_id, "submitter", 202, "POST")
    assert line.request_id == accepted.headers["X-Request-ID"]
    echoed = api.get("/healthz", headers={"X-Request-ID": "ci-job-42-step-3"})
    assert echoed.headers["X-Request-ID"] == "ci-job-42-step-3"
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("submitter")).status_code == 202


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
def test_probes_metrics_and_docs_need_no_token(api, path):
    assert api.get(path).status_code == 200


def test_tokens_are_never_logged(api, caplog):
    with caplog.at_level(logging.DEBUG):
        api.get("/trials", headers=bearer("reader"))
        api.get("/trials", headers={"Authorization": "Bearer wrong-secret-xyz"})
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert SECRETS["reader"] not in text and "wrong-secret-xyz" not in text
    assert "reader" in text  # the token's name is, for the access log


def test_disabled_auth_warns_loudly_at_start(api_settings, caplog):
    with caplog.at_level(logging.WARNING):
        create_app(api_settings.model_copy(update={"auth_disabled": True}))
    assert any("AUTHENTICATION IS DISABLED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_only_the_submitter_or_an_admin_may_cancel_or_extend_a_study(api):
    study = {"base": tiny_trial(queue="gpu"), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "n_trials": 2}
    created = api.post("/studies", json=study, headers=bearer("submitter"))
    assert created.status_code == 202, created.get_json()
    study_id = created.get_json()["id"]
    assert_problem(api.post(f"/studies/{study_id}/extend", json={"n_trials": 1}, headers=bearer("other")), 403, "forbidden")
    assert_problem(api.post(f"/studies/{study_id}/cancel", headers=bearer("other")), 403, "forbidden")
    assert api.post(f"/studies/{study_id}/cancel", headers=bearer("root")).status_code == 202
