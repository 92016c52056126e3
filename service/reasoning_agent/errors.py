"""One error shape for every failure: `{"error": {"type", "message"}}` with the right status.

Each ServiceError subclass fixes a status and a type; this module alone decides which status a
failure gets, LLM failures and stored tasks' errors included.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from reasoning_agent.llm.base import LLMError
from reasoning_agent.tasks.status import ErrorType

__all__ = [
    "BadGateway",
    "BadRequest",
    "Conflict",
    "DatabaseUnavailable",
    "ErrorOut",
    "Forbidden",
    "GatewayTimeout",
    "InvalidRequest",
    "InvalidToken",
    "ModelNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceError",
    "ServiceUnavailable",
    "StoreFailed",
    "TokenBudgetExceeded",
    "TokenRateExceeded",
    "Unauthorized",
    "UpstreamUnreachable",
    "UriTooLong",
    "error_body",
    "error_response",
    "error_responses",
    "for_error_type",
    "for_llm_error",
    "install_handlers",
]

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the API answers with; subclasses fix the status and type."""

    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """The JSON it answers with, as a stream's `error` event carries it too."""
        return error_body(self.type, self.message, extra=self.extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadRequest(ServiceError):
    status, type = 400, "bad_request"


class UriTooLong(ServiceError):
    status, type = 414, "uri_too_long"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"

    def __init__(
        self,
        message: str = "a valid X-API-Key header is required",
        *,
        challenge: str = 'ApiKey header="X-API-Key"',
    ) -> None:
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class InvalidToken(Unauthorized):
    """A bearer token that failed a check (RFC 6750's `invalid_token`)."""

    type = "invalid_token"

    def __init__(self, message: str) -> None:
        super().__init__(message, challenge='Bearer error="invalid_token"')


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


class ModelNotAllowed(Forbidden):
    """The key's policy does not list the model it asked for."""

    type = "model_not_allowed"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Conflict(ServiceError):
    status, type = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class RateLimited(ServiceError):
    status, type = 429, "rate_limited"


class TokenRateExceeded(RateLimited):
    """A token rate window (TOKEN_RATE_LIMIT) lacks room for the request's reservation."""

    type = "token_rate_exceeded"


class TokenBudgetExceeded(RateLimited):
    """A token budget window (TOKEN_BUDGET) lacks room for the request's reservation."""

    type = "token_budget_exceeded"


class BadGateway(ServiceError):
    status, type = 502, ErrorType.UPSTREAM_ERROR


class ServiceUnavailable(ServiceError):
    status, type = 503, ErrorType.UNAVAILABLE


class UpstreamUnreachable(ServiceError):
    """No connection to the LLM upstream could be made or kept."""

    status, type = 502, ErrorType.CONNECTION_ERROR


class StoreFailed(ServiceError):
    """The upstream answered, but the database refused to keep what came back."""

    status, type = 502, ErrorType.STORE_ERROR


class DatabaseUnavailable(ServiceError):
    status, type = 503, "database_unavailable"


class GatewayTimeout(ServiceError):
    status, type = 504, ErrorType.DEADLINE_EXCEEDED


_BY_ERROR_TYPE: dict[str, type[ServiceError]] = {
    cls.type: cls
    for cls in (BadGateway, GatewayTimeout, ServiceUnavailable, StoreFailed, UpstreamUnreachable)
}


def for_error_type(error_type: str | None) -> type[ServiceError]:
    """How a task that failed with `error_type` is answered: 502, 504 or 503."""
    return _BY_ERROR_TYPE.get(error_type or "", BadGateway)


def for_llm_error(exc: LLMError) -> type[ServiceError]:
    """How an LLM failure is answered, by the code its class carries."""
    return for_error_type(exc.code)


def error_response(
    status: int,
    type_: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(type_, message, extra=extra), status_code=status, headers=headers
    )


def error_body(type_: str, message: str, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one shape of every error: `{"error": {"type", "message", ...extra}}`."""
    return {"error": {"type": type_, "message": message, **(extra or {})}}


class ErrorBody(BaseModel):
    type: str
    message: str
    task_id: str | None = None
    details: list[dict[str, str]] | None = None


class ErrorOut(BaseModel):
    """Every error, whatever its status."""

    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route can answer, all in the one error shape."""
    return {status: {"model": ErrorOut, "description": _REASONS[status]} for status in statuses}


_REASONS = {
    400: "Malformed request (not UTF-8, too many query parameters)",
    401: "Missing or unknown X-API-Key, or a bearer token that failed a check",
    403: "The key may not use this endpoint or model",
    404: "No such task for this key",
    409: "The same Idempotency-Key is still in progress",
    413: "Body or prompt too large",
    414: "Query string too long",
    422: "Invalid input",
    429: "Request or token limit exceeded (see Retry-After)",
    502: "The LLM upstream failed, or its answer could not be stored",
    503: "Database, rate-limit store or LLM provider unavailable",
    504: "The LLM deadline passed",
}


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return exc.response()


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append({"field": where, "problem": str(error.get("msg", "invalid"))})
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
    return error_response(
        422, "invalid_request", summary or "invalid request", extra={"details": problems[:20]}
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    types = {
        400: BadRequest.type,
        404: "not_found",
        405: "method_not_allowed",
        413: PayloadTooLarge.type,
    }
    return error_response(
        exc.status_code,
        types.get(exc.status_code, "http_error"),
        str(exc.detail),
        headers=dict(exc.headers or {}),
    )


async def _database_error(_: Request, exc: Exception) -> JSONResponse:
    from reasoning_agent.observability import metrics

    metrics.DATABASE_ERRORS.inc()
    log.error("database error: %s", exc.__class__.__name__)
    return DatabaseUnavailable("the database is not reachable now").response()


def install_handlers(app: FastAPI) -> None:
    """Route every known failure through the one error shape."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # A refused or unresolvable connection reaches the handlers as the socket's own error:
    # SQLAlchemy wraps only what the driver raises once connected.
    for db_error in (DBAPIError, PoolTimeout, ConnectionError, socket.gaierror):
        app.add_exception_handler(db_error, _database_error)
