"""The OpenAPI 3.1 document at ``/openapi.json`` and Swagger UI at ``/docs``, both served offline.

flask-openapi3 generates the document from the pydantic models and the declarations of every
route. Blueprints declare, with the building blocks below:

- security: ``abp_security=BEARER`` on every blueprint whose routes need a token;
- errors: ``abp_responses=PROTECTED_ERRORS`` (or ``PUBLIC_ERRORS``) for the answers any route of
  the blueprint may give, and ``problems(...)`` in a route's ``responses=`` for its own. Each is
  an ``application/problem+json`` :class:`~service.api.errors.Problem`; 429 and 503 carry
  ``Retry-After``.

:func:`complete_document` adds only what flask-openapi3 4.x cannot declare (see there), and
:func:`init_app` checks at start-up that the declared security agrees with :mod:`service.api.auth`.
Swagger UI's assets come from the installed ``flask-openapi3-swagger`` package (no CDN).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from flask import jsonify, render_template_string
from flask_openapi3 import OpenAPI

from service.api.auth import PUBLIC_ENDPOINTS, required_scope

__all__ = [
    "BEARER", "PROTECTED_ERRORS", "PUBLIC_ERRORS", "SECURITY_SCHEMES",
    "ConvtuneOpenAPI", "check_security", "init_app", "problem", "problems",
]

PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}  # registered as flask-openapi3's validation_error_model
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http", "scheme": "bearer", "description": "An API token; its scopes (read, submit, admin) decide the routes it may call.",
    },
}
BEARER = [{"bearerAuth": []}]
REQUEST_ID = {"description": "The caller's X-Request-ID, or a new one; the request_id of its log lines.", "schema": {"type": "string"}, "required": True}
RETRY_AFTER = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}, "required": True}


def problem(status: int, description: str | None = None) -> dict[str, Any]:
    """A response documented as a Problem in problem+json; a 429 or 503 also carries Retry-After."""
    # A dict, not the Problem model: flask-openapi3 documents a model response as application/json only.
    response: dict[str, Any] = {"description": description or HTTPStatus(status).phrase, "content": {PROBLEM_JSON: {"schema": PROBLEM_REF}}}
    if status in (429, 503):
        response["headers"] = {"Retry-After": RETRY_AFTER}
    return response


def problems(*statuses: int) -> dict[int, dict[str, Any]]:
    """``problem(status)`` for each status, ready to spread into a route's ``responses=``."""
    return {status: problem(status) for status in statuses}


# 422 is declared so that flask-openapi3 does not add its own (a JSON list of the model) to every route.
PUBLIC_ERRORS = {
    422: problem(422),
    500: problem(500, "The server failed; the problem is logged, no detail is given."),
}
PROTECTED_ERRORS = {
    **PUBLIC_ERRORS,
    401: problem(401, "No bearer token, or an unknown one (problem+json, WWW-Authenticate: Bearer)."),
    403: problem(403, "The token lacks the scope this route needs, or may not change what another token submitted."),
    429: problem(429, "A rate limit or quota was reached; Retry-After says when to try again."),
}


class ConvtuneOpenAPI(OpenAPI):
    """flask-openapi3's app whose generated document is completed by :func:`complete_document`."""

    def generate_spec_json(self) -> None:
        super().generate_spec_json()
        complete_document(self.spec_json)


def complete_document(doc: dict[str, Any]) -> None:
    """Add what flask-openapi3 4.x cannot declare: X-Request-ID on every answer, the scope of each route.

    - X-Request-ID is set on every answer of every route (by :mod:`service.api.observability`).
      OpenAPI has no document-wide response header, and flask-openapi3 puts headers on a model's
      response only through that model's ``model_config`` (every use of the schema would carry it).
    - The scope a route needs follows from its method (:func:`service.api.auth.required_scope`,
      which also protects routes added later): it is written from that same rule, not repeated on
      every route, so the two cannot drift.
    """
    for item in doc.get("paths", {}).values():
        for method, operation in item.items():
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID
            if operation.get("security"):
                note = f"Needs a token with the `{required_scope(method.upper())}` scope (or `admin`)."
                operation["description"] = f"{operation['description']}\n\n{note}" if operation.get("description") else note


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)  # /trials/<trial_id> -> /trials/{trial_id}


def check_security(app: ConvtuneOpenAPI) -> None:
    """Raise RuntimeError when a documented route's declared security disagrees with what auth enforces."""
    wrong = []
    for rule in app.url_map.iter_rules():
        item = app.paths.get(_openapi_path(rule.rule))
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            operation = getattr(item, method.lower(), None) if item is not None else None
            if operation is not None and bool(operation.security) == (rule.endpoint in PUBLIC_ENDPOINTS):
                wrong.append(f"{method} {rule.rule}")
    if wrong:
        raise RuntimeError(f"documented security disagrees with service.api.auth for: {', '.join(sorted(wrong))} "
                           "(protected blueprints need abp_security=BEARER; public endpoints are listed in auth.PUBLIC_ENDPOINTS)")


def init_app(app: ConvtuneOpenAPI) -> None:
    """Serve the document and the UI; call after every blueprint is registered."""
    from flask_openapi3_swagger.plugins import RegisterPlugin
    from flask_openapi3_swagger.templates import swagger_html_string

    check_security(app)
    app.add_url_rule("/openapi.json", "openapi_json", lambda: jsonify(app.api_doc))
    # The plugin's page loads its assets relative to itself ("swagger/js/..."): serve them at /swagger/.
    app.register_blueprint(RegisterPlugin.register(doc_url="openapi.json"), url_prefix="")
    # validatorUrl None: Swagger UI would otherwise ask an online validator for its badge.
    page = {"doc_url": "/openapi.json", "swagger_config": {"validatorUrl": None, "persistAuthorization": True}, "oauth_config": None}
    app.add_url_rule("/docs", "docs", lambda: render_template_string(swagger_html_string, **page))
