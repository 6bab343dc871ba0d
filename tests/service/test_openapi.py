"""What blueprints declare reaches the document, and security that disagrees with auth fails at start."""

from __future__ import annotations

import pytest
from flask_openapi3 import APIBlueprint

from service.api import openapi
from service.api.errors import Problem


def _app(**blueprint_options) -> openapi.ConvtuneOpenAPI:
    app = openapi.ConvtuneOpenAPI(__name__, validation_error_model=Problem, security_schemes=openapi.SECURITY_SCHEMES, doc_ui=False)
    bp = APIBlueprint("things", __name__, url_prefix="/things", abp_responses=openapi.PROTECTED_ERRORS, **blueprint_options)

    @bp.post("", responses={202: {"description": "Accepted"}, **openapi.problems(409, 503)})
    def create_thing():
        """Create a thing."""

    app.register_api(bp)
    return app


def test_declared_security_and_problems_reach_the_document_with_request_id_and_scope():
    app = _app(abp_security=openapi.BEARER)
    openapi.init_app(app)
    operation = app.test_client().get("/openapi.json").get_json()["paths"]["/things"]["post"]
    assert operation["security"] == [{"bearerAuth": []}]
    assert "`submit` scope" in operation["description"]
    assert {"202", "401", "403", "409", "422", "429", "500", "503"} == set(operation["responses"])
    for status, response in operation["responses"].items():
        assert response["headers"]["X-Request-ID"]["required"] is True
        if status != "202":
            assert list(response["content"]) == ["application/problem+json"]
    assert "Retry-After" in operation["responses"]["429"]["headers"] and "Retry-After" in operation["responses"]["503"]["headers"]


def test_a_protected_route_documented_without_a_token_fails_at_start():
    with pytest.raises(RuntimeError, match="POST /things"):
        openapi.init_app(_app())  # abp_security forgotten: the document would call it public
