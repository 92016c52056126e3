"""Pure ASGI middleware: request ids, the access log and metrics, and authentication (API keys
and bearer tokens)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from urllib.parse import unquote_to_bytes

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reasoning_agent.bearer import BearerVerifier, IssuerUnavailable, TokenRefused
from reasoning_agent.errors import (
    BadRequest,
    InvalidToken,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UriTooLong,
    error_response,
)
from reasoning_agent.keys import ApiKey, KeyRing
from reasoning_agent.observability import logs, metrics
from reasoning_agent.observability.telemetry import span

__all__ = ["AuthMiddleware", "RequestContextMiddleware", "RequestLimitsMiddleware"]

log = logging.getLogger("reasoning_agent.access")

PUBLIC_PATHS = frozenset({"/livez", "/readyz"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContextMiddleware:
    """Gives each request an id, logs one access line, counts it, and never lets a 500 leak a trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        timing, timing_token = metrics.request_timing()
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if not response_started:
                response = error_response(
                    500,
                    "internal_error",
                    "an internal error occurred",
                    headers={"X-Request-ID": rid},
                )
                await response(scope, receive, send)
            status = 500
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(method, template, str(status)).inc()
            metrics.HTTP_REQUEST_SECONDS.labels(method, template).observe(elapsed)
            if timing.llm_seconds is not None:  # what this service added on top of the LLM
                overhead = max(0.0, elapsed - timing.llm_seconds)
                metrics.OVERHEAD_SECONDS.labels(template).observe(overhead)
            caller = scope.get("state", {}).get("api_key")
            log.info(
                "request",
                extra={
                    "method": method,
                    "route": template,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "key": caller.name if caller else None,
                },
            )
            metrics.end_request_timing(timing_token)
            logs.request_id.reset(token)


class AuthMiddleware:
    """Refuses any request without a valid X-API-Key (or, with `bearer`, a valid bearer token)
    before its body is read; probes are exempt."""

    def __init__(
        self, app: ASGIApp, *, keyring: KeyRing, bearer: BearerVerifier | None = None
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.bearer = bearer
        self._missing = Unauthorized(
            "a valid X-API-Key header or bearer token is required"
            if bearer
            else "a valid X-API-Key header is required",
            challenge='ApiKey header="X-API-Key", Bearer'
            if bearer
            else 'ApiKey header="X-API-Key"',
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            with span("authenticate") as current:
                try:
                    caller = await self._caller(Headers(scope=scope))
                except ServiceError as refused:
                    metrics.AUTH_FAILURES.inc()
                    if current.is_recording():
                        current.set_attribute("reasoning_agent.authenticated", False)
                    await refused.response()(scope, receive, send)
                    return
                if current.is_recording():
                    current.set_attribute("reasoning_agent.authenticated", True)
                    current.set_attribute("reasoning_agent.key", caller.name)
            scope.setdefault("state", {})["api_key"] = caller
        await self.app(scope, receive, send)

    async def _caller(self, headers: Headers) -> ApiKey:
        presented = headers.get("x-api-key")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # Without OIDC an Authorization header beside a key is someone else's business.
        if scheme.lower() != "bearer" or (self.bearer is None and presented is not None):
            caller = self.keyring.authenticate(presented)
            if caller is None:
                raise self._missing
            return caller
        if presented is not None:
            raise BadRequest("send either X-API-Key or a bearer token, not both")
        if self.bearer is None:
            raise InvalidToken("bearer tokens are not accepted here: OIDC_ISSUER is not set")
        try:
            name = await self.bearer.principal(token.strip())
        except TokenRefused as exc:
            log.info("bearer token refused: %s", exc)
            raise InvalidToken(f"the bearer token was refused: {exc}") from None
        except IssuerUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from None
        return ApiKey(name=name, fingerprint="")


class RequestLimitsMiddleware:
    """Refuses oversized or malformed input before any of it is parsed: a body over `max_bytes`
    (413, at once by Content-Length, else as it streams in), a long query string (414), too many
    query parameters or a query that is not UTF-8 (400)."""

    MAX_QUERY_BYTES = 16384
    MAX_QUERY_PARAMS = 64

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._query_problem(scope.get("query_string", b""))
        if problem is not None:
            await problem.response()(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # HTTPException passes through FastAPI's body parsing to the 413 handler.
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")

    def _query_problem(self, query: bytes) -> ServiceError | None:
        if not query:
            return None
        if len(query) > self.MAX_QUERY_BYTES:
            return UriTooLong(f"query string is longer than {self.MAX_QUERY_BYTES} bytes")
        if query.count(b"&") + 1 > self.MAX_QUERY_PARAMS:
            return BadRequest(f"more than {self.MAX_QUERY_PARAMS} query parameters")
        try:
            unquote_to_bytes(query.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            return BadRequest("query string is not valid UTF-8")
        return None
