"""Dependencies as Annotated aliases, so a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request, Response

from reasoning_agent.errors import RateLimited, ServiceUnavailable, Unauthorized
from reasoning_agent.keys import ApiKey
from reasoning_agent.observability import metrics
from reasoning_agent.observability.telemetry import span
from reasoning_agent.ratelimit import Decision, StoreUnavailable
from reasoning_agent.services import Services
from reasoning_agent.tasks.service import TaskService

__all__ = [
    "ApiKeyDep",
    "QueryLimitDep",
    "ServicesDep",
    "TaskLimitDep",
    "TaskServiceDep",
    "document_api_key",
]


# Each reads the lifespan's Services off the app rather than depending on a Services
# dependency: FastAPI resolves every dependency anew on each request.
async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _task_service(request: Request) -> TaskService:
    services: Services = request.app.state.services
    return services.tasks


ServicesDep = Annotated[Services, Depends(_services)]
TaskServiceDep = Annotated[TaskService, Depends(_task_service)]


def _authenticated(request: Request) -> ApiKey:
    caller: ApiKey | None = getattr(request.state, "api_key", None)
    if caller is None:
        raise Unauthorized()
    return caller


async def _caller(request: Request) -> ApiKey:
    """The caller AuthMiddleware already checked. (The scheme is in OpenAPI through
    `document_api_key` rather than a Security dependency, which would run on every request.)"""
    return _authenticated(request)


ApiKeyDep = Annotated[ApiKey, Depends(_caller)]


# The limits, too, take what they need from the request rather than from other dependencies.
async def _task_limit(request: Request, response: Response) -> Decision:
    return await _limit("task", request, response)


async def _query_limit(request: Request, response: Response) -> Decision:
    return await _limit("query", request, response)


async def _limit(scope: Literal["task", "query"], request: Request, response: Response) -> Decision:
    services: Services = request.app.state.services
    caller = _authenticated(request)
    settings = services.settings
    items = settings.rate_limits if scope == "task" else settings.query_rate_limits
    with span("rate_limit") as current:
        try:
            decision = await services.limiter.hit(scope, caller.name, items)
        except StoreUnavailable:
            raise ServiceUnavailable(
                "rate limits cannot be checked now (RATE_LIMIT_ON_STORE_ERROR=deny)"
            ) from None
        if current.is_recording():
            current.set_attribute("reasoning_agent.rate_limit.scope", scope)
            current.set_attribute("reasoning_agent.rate_limit.allowed", decision.allowed)
            current.set_attribute("reasoning_agent.rate_limit.remaining", decision.remaining)
            current.set_attribute("reasoning_agent.key", caller.name)
    if not decision.allowed:
        metrics.RATE_LIMITED.labels(caller.name, scope).inc()
        raise RateLimited(
            f"rate limit of {decision.limit} exceeded for key {caller.name!r}; "
            f"retry in {decision.retry_after}s",
            headers={"Retry-After": str(decision.retry_after), **decision.headers},
        )
    response.headers.update(decision.headers)
    return decision


def document_api_key(app: FastAPI, *, public: frozenset[str]) -> None:
    """Declare the X-API-Key scheme in OpenAPI, on every operation but the `public` paths."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["APIKeyHeader"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            for path, operations in schema["paths"].items():
                if path not in public:
                    for operation in operations.values():
                        operation["security"] = [{"APIKeyHeader": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


TaskLimitDep = Annotated[Decision, Depends(_task_limit)]
QueryLimitDep = Annotated[Decision, Depends(_query_limit)]
