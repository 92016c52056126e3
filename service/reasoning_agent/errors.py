"""One error shape for every failure: `{"error": {"type", "message"}}` with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "BadGateway",
    "BadRequest",
    "Conflict",
    "GatewayTimeout",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "UriTooLong",
    "error_response",
    "for_llm_error",
    "for_type",
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

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.type, self.message, headers=self.headers, extra=self.extra
        )


class BadRequest(ServiceError):
    status, type = 400, "bad_request"


class UriTooLong(ServiceError):
    status, type = 414, "uri_too_long"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str = "a valid X-API-Key header is required") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'})


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


class BadGateway(ServiceError):
    status, type = 502, "upstream_error"


class ServiceUnavailable(ServiceError):
    status, type = 503, "unavailable"


class GatewayTimeout(ServiceError):
    status, type = 504, "deadline_exceeded"


def for_llm_error(exc: Exception) -> type[ServiceError]:
    """How an LLM failure is answered: 502, 504 or 503."""
    from reasoning_agent import llm

    mapping: dict[type[Exception], type[ServiceError]] = {
        llm.UpstreamError: BadGateway,
        llm.DeadlineExceeded: GatewayTimeout,
        llm.NotConfigured: ServiceUnavailable,
    }
    return mapping.get(type(exc), BadGateway)


def for_type(error_type: str | None) -> type[ServiceError]:
    """The error class of a stored task's error_type, to answer a replay as the first time."""
    known = {cls.type: cls for cls in (BadGateway, GatewayTimeout, ServiceUnavailable)}
    return known.get(error_type or "", BadGateway)


def error_response(
    status: int,
    type_: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "message": message, **(extra or {})}},
        status_code=status,
        headers=headers,
    )


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
    from reasoning_agent import metrics

    metrics.DATABASE_ERRORS.inc()
    log.error("database error: %s", exc.__class__.__name__)
    return error_response(503, "database_unavailable", "the database is not reachable now")


def install_handlers(app: FastAPI) -> None:
    """Route every known failure through the one error shape."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for db_error in (DBAPIError, PoolTimeout):
        app.add_exception_handler(db_error, _database_error)
