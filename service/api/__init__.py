"""The convtune API: a Flask app that validates specs and hands them to GPU workers.

Run it with ``gunicorn "service.api:create_app()"`` or ``convtune api``. This package never imports
torch (a test guards it): it validates and sizes specs with the torch-free ``models`` modules,
records trials in MLflow and sends them to workers through Celery by task name.
"""

from __future__ import annotations

import json
import logging

from flask import request
from flask_openapi3 import Info, OpenAPI

from service.api import errors
from service.api.settings import ApiSettings

__all__ = ["create_app"]

__version__ = "0.1.0"


def create_app(settings: ApiSettings | None = None) -> OpenAPI:
    """Build the API; tests pass their own ``settings``, servers read ``CONVTUNE_*`` variables."""
    from models.logs import configure_logging
    from service.api import auth, events, health, limits, logs, lr_finder, observability, openapi, teams, trials, usage, wiring
    from service.api.studies import views as studies

    settings = settings or ApiSettings()
    configure_logging("api", settings.log_format, settings.log_level)
    app = openapi.ConvtuneOpenAPI(
        __name__,
        info=Info(title="convtune", version=__version__, description="Hyperparameter tuning for convolutional networks."),
        validation_error_status=422,
        validation_error_model=errors.Problem,
        validation_error_callback=errors.validation_error_response,
        security_schemes=openapi.SECURITY_SCHEMES,
        doc_ui=False,  # served by service.api.openapi at /openapi.json and /docs
    )
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    errors.init_app(app)
    built = wiring.init_app(app, settings)
    # before_request hooks run in this order: time and log, authenticate, rate-limit, check the body.
    observability.init_app(app, settings, built.redis, built.celery)
    auth.init_app(app, settings)
    limits.init_app(app, settings)
    app.before_request(_require_json_body)
    app.register_api(health.bp)
    app.register_api(trials.bp)
    app.register_api(studies.bp)
    app.register_api(lr_finder.bp)
    app.register_api(logs.bp)  # a run's own log lines, from its artifacts
    app.register_api(events.bp)  # each open stream holds a gunicorn thread: see service.api.events
    app.register_api(teams.bp)
    app.register_api(usage.bp)
    app.register_api(observability.bp)
    openapi.init_app(app)  # last: it reads every registered route
    logging.getLogger(__name__).info("convtune API ready: MLflow at %s, broker at %s", settings.mlflow_tracking_uri, _redact(settings.redis_url))
    return app


def _require_json_body() -> None:
    """Refuse a body that is not JSON (415) or not well-formed JSON (400) before any view runs."""
    if request.method not in ("POST", "PUT", "PATCH") or not request.content_length:
        return
    if not request.is_json:
        raise errors.UnsupportedMediaType(f"send the body as application/json (got {request.mimetype or 'no Content-Type'})")
    try:
        json.loads(request.get_data())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError say where it broke
        raise errors.BadRequest(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # thousands of nested [ or {
        raise errors.BadRequest("the body is nested too deeply to be a spec") from exc


def _redact(url: str) -> str:
    # redis://:password@host -> redis://***@host
    head, sep, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//***@{tail}" if sep else url
