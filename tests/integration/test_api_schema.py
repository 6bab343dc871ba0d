"""Every route in the OpenAPI document answers as documented: schemathesis against the real app.

The app runs in-process (schemathesis' WSGI transport) with auth on, backed by the session's real
Redis and mlflow server. Everything it accepts is cancelled at the end, so no worker trains it.
Also: the document is OpenAPI 3.1 and complete, and /docs works offline; and no body, however
nested, extreme, mistyped, empty or not JSON at all, gets a 500 from any POST route (hypothesis).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

ADMIN = f"ct_schema_{uuid.uuid4().hex}"
EXAMPLES = 25  # per operation
EXTREME_EXAMPLES = 300  # nested and extreme bodies, over every POST route (a few seconds)
CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance,
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


# --- nested and extreme inputs on every POST route --------------------------------------------------

NOBODY = "0" * 32  # a well-formed id no run has: a body that passes every check meets a 404, and changes nothing
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}, "model.activation": ["relu", "gelu"]}
VALID: dict[str, Any] = {  # a body each POST route accepts (the cancels take none)
    "/trials": tiny_trial(name="extreme", tags={"k": "v"}),
    "/studies": {"base": tiny_trial(), "search_space": SPACE, "n_trials": 2, "warm_start": [{"model.activation": "relu"}], "tags": {"k": "v"}},
    "/lr-finder": {"trial": tiny_trial(), "steps": 50},
    f"/studies/{NOBODY}/extend": {"n_trials": 1, "warm_start": [{"model.activation": "relu"}]},
    f"/trials/{NOBODY}/cancel": None,
    f"/studies/{NOBODY}/cancel": None,
    f"/lr-finder/{NOBODY}/cancel": None,
}
ROUTES = list(VALID)
EXTREME_NUMBERS = [
    0, -0.0, 5e-324, -5e-324, 1e-310, 1e308, -1e308, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf"),
    2**31, 2**63, -(2**63) - 1, 2**64, 10**300, -(10**300), 10**4000, -1, 0.5, 1e-12,
]
NASTY_STRINGS = [
    "", " ", "\x00", "\ud800", "\udfff\ud800", "\u202e\u200b\ufeff", "\U0001f600" * 100, "x" * 5000, "x" * 100_000, "é" * 50_000,
    "../../etc/passwd", "${jndi:ldap://x}", "<script>", "1e309", "NaN", "relu\x00", "a" * 65, "k.k", "\n\r\t",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EXTREME_NUMBERS),
    st.text(max_size=40), st.sampled_from(NASTY_STRINGS),
)
keys = st.text(max_size=12) | st.sampled_from(["model", "optim", "data", "type", "choices", "low", "high", "when", "callback_url"])
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
CONTENT_TYPES = [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "application/xml", "application/octet-stream",
    "application/json; charset=utf-16", "application/json; charset=latin-1", "application/problem+json", "application/vnd.api+json", "", "*/*",
]


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in ``doc``, the whole body included."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, prefix + (index,))
    return found


def _with(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    doc = copy.deepcopy(doc)
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


def _encode(body: Any) -> bytes:
    # json.dumps writes NaN and Infinity (and lone surrogates as \\udXXX escapes), as a careless client would.
    return json.dumps(body).encode()


@st.composite
def mistyped(draw) -> tuple[str, dict[str, str], bytes]:
    """A valid body with one value, at any level (the whole body too), replaced by anything; or a key added."""
    route = draw(st.sampled_from(ROUTES))
    base = VALID[route] if VALID[route] is not None else {}
    path = draw(st.sampled_from(_paths(base)))
    if draw(st.booleans()) or not path:
        body = _with(base, path, draw(json_values))
    else:
        parent = path[:-1]
        target = base
        for part in parent:
            target = target[part]
        grown = {**target, draw(st.text(min_size=1, max_size=20)): draw(json_values)} if isinstance(target, dict) else [*target, draw(json_values)]
        body = _with(base, parent, grown)
    return route, {"Content-Type": "application/json"}, _encode(body)


@st.composite
def deeply_nested(draw) -> tuple[str, dict[str, str], bytes]:
    """Lists or objects nested up to 100,000 deep, as the whole body or in one of its fields."""
    route = draw(st.sampled_from(ROUTES))
    depth = draw(st.sampled_from([2, 50, 500, 900, 990, 1000, 1100, 5000, 100_000]))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"model":{"channels":', "}}")]))
    nested = opening * depth + "0" + closing * depth
    base = VALID[route] if VALID[route] is not None else {"n_trials": 1}
    path = draw(st.sampled_from(_paths(base)))
    marker = "__NESTED__"
    text = nested if not path else json.dumps(_with(base, path, marker)).replace(json.dumps(marker), nested)
    return route, {"Content-Type": "application/json"}, text.encode()


@st.composite
def not_json(draw) -> tuple[str, dict[str, str], bytes]:
    """Empty bodies, bodies that are not JSON, and JSON under content types that are not."""
    route = draw(st.sampled_from(ROUTES))
    body = draw(st.one_of(
        st.sampled_from([b"", b"{}", b"[]", b"null", b"0", b'""', b"{", b"[1,", b'{"a":NaN}', b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b"{} {}", b"a=1"]),
        st.binary(max_size=64),
        st.builds(lambda v: _encode(v), json_values),
        st.just(_encode(VALID[route] or {})),
    ))
    content_type = draw(st.sampled_from(["application/json", *CONTENT_TYPES]))
    return route, ({"Content-Type": content_type} if content_type else {}), body


def assert_clean(response, route: str) -> None:
    """Never a 5xx; a 4xx is a problem document (strict JSON) and a 422 names each field."""
    assert response.status_code < 500, (route, response.status_code, response.get_data(as_text=True)[:1000])
    strict = json.loads(response.get_data(as_text=True), parse_constant=lambda c: pytest.fail(f"{route}: {c} in the answer is not JSON"))
    if response.status_code >= 400:
        assert response.mimetype == "application/problem+json", (route, response.status_code)
        assert strict["status"] == response.status_code and strict["type"] and strict["title"] and strict["detail"]
        if response.status_code == 422:
            assert strict["errors"] and all(isinstance(e["field"], str) and e["message"] for e in strict["errors"]), strict
    else:
        assert response.status_code == 202 and route in ("/trials", "/studies", "/lr-finder"), (route, response.status_code)


@pytest.mark.parametrize("body", [
    b"[" * 200_000, b'{"a":' * 50_000 + b"0" + b"}" * 50_000, b"[" * 990 + b"]" * 990,
    _encode({"base": tiny_trial(), "search_space": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.01, "step": 5e-324}}}),
    _encode({"base": tiny_trial(), "search_space": {"model.activation": {"type": "categorical", "choices": [json.loads("[" * 900 + "]" * 900), 1]}}}),
    _encode({"base": tiny_trial(), "search_space": {"optim.epochs": {"type": "int", "low": -(2**63), "high": 2**63}}}),
    _encode({"base": tiny_trial(), "search_space": {"optim.lr": {"type": "float", "low": float("-inf"), "high": float("inf")}}}),
    _encode({"base": tiny_trial(), "search_space": {"optim.lr": {"type": "float", "low": float("nan"), "high": 1.0}}}),
    _encode({"base": tiny_trial(), "search_space": SPACE, "target": float("nan"), "timeout_s": float("inf")}),
    _encode({"base": tiny_trial(name="\ud800", tags={"k": "\udfff"}), "search_space": SPACE, "name": "\ud800"}),
    _encode(tiny_trial(optim={"lr": float("nan")}, name="\ud800\x00")),
    _encode(tiny_trial(optim={"lr": 10**4000})),
    _encode({"trial": tiny_trial(), "start_lr": 5e-324, "end_lr": 1e308}),
    _encode({"n_trials": 2**64, "warm_start": [{"model.activation": float("nan")}]}),
], ids=lambda b: b[:40].decode(errors="replace"))
@pytest.mark.parametrize("route", ["/trials", "/studies", "/lr-finder", f"/studies/{NOBODY}/extend"])
def test_known_extremes_are_4xx_problems_never_500(schema_app, route, body):
    response = schema_app.test_client().post(route, data=body, headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    assert_clean(response, route)


def test_nested_extreme_mistyped_empty_and_non_json_bodies_never_get_a_500(schema_app):
    client = schema_app.test_client()

    @given(case=st.one_of(mistyped(), deeply_nested(), not_json()), key=st.none() | st.text(max_size=300))
    @settings(max_examples=EXTREME_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def never_a_500(case, key):
        route, headers, body = case
        headers = {**headers, "Authorization": f"Bearer {ADMIN}"}
        if key is not None and key.isprintable() and key.isascii():
            headers["Idempotency-Key"] = key
        assert_clean(client.post(route, data=body, headers=headers), route)

    never_a_500()
