"""Errors the API answers with, all as ``application/problem+json`` (RFC 9457).

    ApiError                      status  type
     +-- BadRequest                 400   bad-request         malformed JSON, bad query values
     +-- Unauthorized               401   unauthorized        no bearer token, or an unknown one
     +-- Forbidden                  403   forbidden           the token lacks the scope the route needs
     +-- NotFound                   404   not-found           no such trial / study / route
     +-- Conflict                   409   conflict            the resource's state forbids it
     |    +-- IdempotencyConflict   409   idempotency-conflict  the Idempotency-Key was used for another body
     +-- PayloadTooLarge            413   payload-too-large
     +-- UnsupportedMediaType       415   unsupported-media-type
     +-- InvalidSpec                422   invalid-spec        pydantic rejected a field (``errors``)
     |    +-- InfeasibleSpec        422   infeasible-spec     the architecture cannot run on its input
     +-- TooManyRequests            429   too-many-requests   a rate limit or a quota (queued trials); Retry-After
     |    +-- QuotaExceeded         429   quota-exceeded      a team's compute quota (``quota``: limit, use, estimate)
     +-- ServiceUnavailable         503   service-unavailable Redis or MLflow did not answer

Foreign errors are translated where they enter (``raise ... from``); anything else that escapes a
view is logged and becomes a 500 ``internal-error`` without details. Every problem has a stable
``type`` URI, a ``title``, a human ``detail``, the ``status`` and, for validation, ``errors``: a
list of ``{"field": "optim.lr", "message": ...}``. ApiError derives from ConvtuneError, the root both
processes share (:mod:`models.errors`), whose own classes (InfeasibleArchitecture, InvalidData...) are
translated into these where they enter the API.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from pydantic import BaseModel, Field, ValidationError
from werkzeug.exceptions import HTTPException

from models.errors import ConvtuneError

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "FieldError",
    "Forbidden",
    "IdempotencyConflict",
    "InfeasibleSpec",
    "InvalidSpec",
    "NotFound",
    "PayloadTooLarge",
    "Problem",
    "QuotaExceeded",
    "QuotaProblem",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "init_app",
    "problem_response",
]

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://convtune.dev/problems/"
log = logging.getLogger(__name__)


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. 'optim.lr' or 'model.channels.2'.")
    message: str


class QuotaProblem(BaseModel):
    """Which compute quota a submit is over, in device-seconds (``quota-exceeded`` problems only)."""

    team: str | None = Field(description="The team whose quota it is.")
    quota: str = Field(description="device_seconds_per_day (rolling 24 h) or queued_device_seconds.")
    limit: float = Field(description="The team's limit.")
    used: float = Field(description="What counts against it now: ended in the last 24 h (daily quota only) plus accepted and not ended.")
    estimate: float = Field(description="This submit's estimate.")
    retry_after_s: int | None = Field(description="Seconds until it frees up enough for this submit (also the Retry-After header); null: never.")
    frees_at: str | None = Field(description="When it frees up (ISO 8601, UTC); null: never, this submit alone is over the limit.")


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    quota: QuotaProblem | None = None


class ApiError(ConvtuneError):
    """Base of every error the API answers with a problem document."""

    status = 500
    slug = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str, *, errors: list[FieldError] | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def to_problem(self) -> Problem:
        return Problem(type=TYPE_BASE + self.slug, title=self.title, status=self.status, detail=self.detail, errors=self.errors, quota=getattr(self, "quota", None))


class BadRequest(ApiError):
    """The request could not be read (malformed JSON, a bad query parameter)."""

    status, slug, title = 400, "bad-request", "Bad request"


class Unauthorized(ApiError):
    """No valid bearer token; the answer carries ``WWW-Authenticate: Bearer``."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str, **kwargs: Any):
        super().__init__(detail, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="convtune"')


class Forbidden(ApiError):
    """The token is valid but lacks the scope this route needs."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ApiError):
    """No resource at this address."""

    status, slug, title = 404, "not-found", "Not found"


class Conflict(ApiError):
    """The resource's current state does not allow the request."""

    status, slug, title = 409, "conflict", "Conflict"


class IdempotencyConflict(Conflict):
    """The Idempotency-Key was already used with a different body, or its first request is still running."""

    slug, title = "idempotency-conflict", "Idempotency-Key reused"


class PayloadTooLarge(ApiError):
    """The body is larger than the configured limit."""

    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(ApiError):
    """The body is not JSON."""

    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class InvalidSpec(ApiError):
    """A field of the submitted spec is missing, unknown, of the wrong type or out of bounds."""

    status, slug, title = 422, "invalid-spec", "Invalid spec"

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> InvalidSpec:
        errors = [FieldError(field=_field_path(e["loc"]), message=_message(e["msg"])) for e in exc.errors(include_url=False)]
        fields = ", ".join(e.field or "(body)" for e in errors)
        return cls(f"{len(errors)} invalid field(s): {fields}", errors=errors)


class InfeasibleSpec(InvalidSpec):
    """The architecture cannot run on its input (a map below 1x1, a kernel larger than its input)."""

    slug, title = "infeasible-spec", "Infeasible architecture"


class TooManyRequests(ApiError):
    """A rate limit or a quota was reached; ``Retry-After`` says when to try again."""

    status, slug, title = 429, "too-many-requests", "Too many requests"

    def __init__(self, detail: str, *, retry_after_s: int = 1, **kwargs: Any):
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(max(1, retry_after_s)))


class QuotaExceeded(TooManyRequests):
    """A submit is over its team's compute quota; ``quota`` says which, the use, the estimate and when it frees up."""

    slug, title = "quota-exceeded", "Compute quota exceeded"

    def __init__(self, detail: str, *, team: str | None, refusal: Any, **kwargs: Any):
        from datetime import datetime, timezone

        never = refusal.frees_at is None
        super().__init__(detail, retry_after_s=refusal.retry_after_s, **kwargs)
        self.quota = QuotaProblem(
            team=team, quota=refusal.quota, limit=refusal.limit, used=round(refusal.used, 3), estimate=round(refusal.estimate, 3),
            retry_after_s=None if never else refusal.retry_after_s,
            frees_at=None if never else datetime.fromtimestamp(refusal.frees_at, timezone.utc).isoformat(),
        )


class ServiceUnavailable(ApiError):
    """A dependency (Redis, MLflow) did not answer; nothing was half-accepted. Retry later."""

    status, slug, title = 503, "service-unavailable", "Service unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 5, **kwargs: Any):
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after_s))


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the model_validator's errors at the model's loc, and union tags into loc:
    # keep only the field names and list indices a client wrote.
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and part.startswith("function-")))


def _message(msg: str) -> str:
    # pydantic prefixes a validator's own message with "Value error, ": the reason reads better alone.
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def problem_response(error: ApiError) -> Response:
    problem = error.to_problem()
    document = problem.model_dump(exclude_none=True)
    if problem.quota is not None:
        document["quota"] = problem.quota.model_dump()  # its nulls say something: never frees up
    response = jsonify(document)
    response.status_code = error.status
    response.mimetype = PROBLEM_JSON
    for key, value in error.headers.items():
        response.headers[key] = value
    return response


_HTTP_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 429: TooManyRequests,
}


def _from_http_exception(exc: HTTPException) -> Response:
    if exc.response is not None and exc.response.mimetype == PROBLEM_JSON:
        return exc.response  # already a problem (flask-openapi3's validation callback)
    cls = _HTTP_ERRORS.get(exc.code or 500)
    if cls is None:
        # 405 and other routing errors: keep their status, still as a problem document.
        error = ApiError(exc.description or exc.name)
        error.status, error.slug, error.title = exc.code or 500, exc.name.lower().replace(" ", "-"), exc.name
    else:
        error = cls(exc.description or exc.name)
    response = problem_response(error)
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _from_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(ApiError("The server failed to handle the request; it has been logged."))


def validation_error_response(exc: ValidationError) -> Response:
    """flask-openapi3's ``validation_error_callback``: pydantic errors as a 422 problem."""
    return problem_response(InvalidSpec.from_validation_error(exc))


def init_app(app: Flask) -> None:
    """Answer every error, ours, werkzeug's and unexpected ones, with a problem document."""
    app.register_error_handler(ApiError, problem_response)
    app.register_error_handler(HTTPException, _from_http_exception)
    app.register_error_handler(Exception, _from_unexpected)
