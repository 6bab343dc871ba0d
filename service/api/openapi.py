"""The OpenAPI 3.1 document at ``/openapi.json`` and Swagger UI at ``/docs``, both served offline.

flask-openapi3 generates the document from the pydantic models of every route; this module
completes what it cannot know: every error is ``application/problem+json`` (a :class:`Problem`),
protected routes name the bearer scheme and the scope they need and answer 401/403/429, and every
route may answer 500. Swagger UI's assets come from the installed ``flask-openapi3-swagger``
package (no CDN).
"""

from __future__ import annotations

import re
from typing import Any

from flask import jsonify, render_template_string
from flask_openapi3 import OpenAPI

from service.api.auth import PUBLIC_ENDPOINTS, required_scope

__all__ = ["ConvtuneOpenAPI", "SECURITY_SCHEMES", "init_app"]

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_JSON = "application/problem+json"
SECURITY_SCHEMES = {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API token; its scopes (read, submit, admin) decide the routes it may call."}}
_ERRORS = {
    "401": "No bearer token, or an unknown one (problem+json, WWW-Authenticate: Bearer).",
    "403": "The token lacks the scope this route needs.",
    "429": "A rate limit or quota was reached; Retry-After says when to try again.",
    "500": "The server failed; the problem is logged, no detail is given.",
}


class ConvtuneOpenAPI(OpenAPI):
    """flask-openapi3's app whose generated document is completed by :func:`complete_document`."""

    public_paths: set[tuple[str, str]] = set()

    def generate_spec_json(self) -> None:
        super().generate_spec_json()
        complete_document(self.spec_json, self.public_paths)


REQUEST_ID = {"description": "The caller's X-Request-ID, or a new one; the request_id of its log lines.", "schema": {"type": "string"}, "required": True}
RETRY_AFTER = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}, "required": True}


def _is_problem(response: dict[str, Any]) -> bool:
    """An error answer documented with the Problem model (as itself, or flask-openapi3's 422 list of it)."""
    schemas = [media.get("schema", {}) for media in (response.get("content") or {}).values()]
    return not schemas or any(PROBLEM_REF in (schema, schema.get("items")) for schema in schemas)


def _problem_content() -> dict[str, Any]:
    return {PROBLEM_JSON: {"schema": PROBLEM_REF}}


def complete_document(doc: dict[str, Any], public: set[tuple[str, str]]) -> None:
    """Errors as problem+json, security and scopes per operation, the shared error answers."""
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status.startswith(("4", "5")) and _is_problem(response):
                    response["content"] = _problem_content()
                    if status in ("429", "503"):
                        response["headers"] = {"Retry-After": RETRY_AFTER}
            for response in responses.values():
                response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID
            codes = ["500"] if (path, method) in public else ["401", "403", "429", "500"]
            for code in codes:
                if code not in responses:
                    responses[code] = {"description": _ERRORS[code], "content": _problem_content(), "headers": {"X-Request-ID": REQUEST_ID}}
                    if code == "429":
                        responses[code]["headers"]["Retry-After"] = RETRY_AFTER
            if (path, method) in public:
                operation["security"] = []
            else:
                scope = required_scope(method.upper())
                operation["security"] = [{"bearerAuth": []}]
                note = f"Needs a token with the `{scope}` scope (or `admin`)."
                operation["description"] = f"{operation['description']}\n\n{note}" if operation.get("description") else note


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)  # /trials/<trial_id> -> /trials/{trial_id}


def init_app(app: ConvtuneOpenAPI) -> None:
    """Serve the document and the UI; call after every blueprint is registered."""
    from flask_openapi3_swagger.plugins import RegisterPlugin
    from flask_openapi3_swagger.templates import swagger_html_string

    app.public_paths = {
        (_openapi_path(rule.rule), method.lower())
        for rule in app.url_map.iter_rules() if rule.endpoint in PUBLIC_ENDPOINTS
        for method in (rule.methods or ())
    }
    app.add_url_rule("/openapi.json", "openapi_json", lambda: jsonify(app.api_doc))
    # The plugin's page loads its assets relative to itself ("swagger/js/..."): serve them at /swagger/.
    app.register_blueprint(RegisterPlugin.register(doc_url="openapi.json"), url_prefix="")
    # validatorUrl None: Swagger UI would otherwise ask an online validator for its badge.
    page = {"doc_url": "/openapi.json", "swagger_config": {"validatorUrl": None, "persistAuthorization": True}, "oauth_config": None}
    app.add_url_rule("/docs", "docs", lambda: render_template_string(swagger_html_string, **page))
