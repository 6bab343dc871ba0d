"""Every route in the OpenAPI document answers as documented: schemathesis against the real app.

The app runs in-process (schemathesis' WSGI transport) with auth on, backed by the session's real
Redis and mlflow server. Everything it accepts is cancelled at the end, so no worker trains it.
Also: the document is OpenAPI 3.1 and complete, and /docs works offline.
"""

from __future__ import annotations

import re
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.failures import FailureGroup

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig

pytestmark = pytest.mark.integration

ADMIN = f"ct_schema_{uuid.uuid4().hex}"
EXAMPLES = 25  # per operation
CHECKS = [
    checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
    checks.response_schema_conformance, checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def schema_app(api_settings: ApiSettings, mlflow_client):
    settings = api_settings.model_copy(update={
        "auth_disabled": False, "auth_tokens": [TokenConfig(name="schemathesis", sha256=hash_token(ADMIN), scopes=["admin"])],
        "experiment": f"schema-{uuid.uuid4().hex[:8]}", "default_queue": "gpu", "max_epochs": 50,
        "rate_limit": "100000/minute", "submit_rate_limit": "100000/minute", "max_queued_trials_per_token": 100000,
    })
    app = create_app(settings)
    yield app
    # End whatever was accepted, so a worker that later receives its message skips it.
    experiment = mlflow_client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        for run in mlflow_client.search_runs([experiment.experiment_id], filter_string="attributes.status != 'FINISHED'", max_results=5000):
            if run.info.status in ("SCHEDULED", "RUNNING"):
                mlflow_client.set_terminated(run.info.run_id, status="KILLED")


def test_every_route_answers_as_documented(schema_app):
    # schemathesis' pytest plugin cannot take a fixture-built app under pytest 9 (its lazy loader reads a
    # private attribute pytest removed), so each operation's strategy is driven by hypothesis here.
    api_schema = schemathesis.openapi.from_wsgi("/openapi.json", schema_app)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    failures: dict[str, str] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def answers_as_documented(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS)

        try:
            answers_as_documented()
        except (Exception, FailureGroup) as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def test_document_is_openapi_31_with_every_route_and_problem_errors(schema_app):
    client = schema_app.test_client()
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    routed = {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method.lower())
        for rule in schema_app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint not in ("openapi_json", "docs", "static") and not rule.endpoint.startswith("swagger.")
    }
    assert routed == documented
    assert {"/trials", "/studies", "/lr-finder", "/metrics"} <= set(doc["paths"])
    for path, method in documented:
        operation = doc["paths"][path][method]
        assert operation.get("summary"), (path, method)
        for status, response in operation["responses"].items():
            assert response["headers"]["X-Request-ID"]["required"] is True
            if status.startswith(("4", "5")) and (path, status) != ("/readyz", "503"):  # readyz's 503 is its Health report
                assert list(response["content"]) == ["application/problem+json"], (path, method, status)
            if status in ("429", "503") and path != "/readyz":
                assert "Retry-After" in response["headers"], (path, method, status)
        assert "500" in operation["responses"]
        if path not in ("/healthz", "/readyz", "/metrics"):
            assert operation["security"] == [{"bearerAuth": []}]
            assert {"401", "403", "429"} <= set(operation["responses"])
    create = doc["paths"]["/trials"]["post"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in create["parameters"])
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_swagger_ui_is_served_offline(schema_app):
    client = schema_app.test_client()
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), "the page loads something from another host"
    assets = re.findall(r"(?:src|href)=\"([^\"]+)\"", html)
    assert assets and all(client.get(f"/{a.lstrip('/')}").status_code == 200 for a in assets)
    assert '"validatorUrl": null' in html  # no badge fetched from an online validator
    bundle = client.get("/swagger/js/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.data) > 100_000
