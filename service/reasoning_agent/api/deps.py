"""Dependencies as Annotated aliases, so a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from reasoning_agent import metrics
from reasoning_agent.agent import ReasoningAgent
from reasoning_agent.config import Settings
from reasoning_agent.db import Database
from reasoning_agent.errors import RateLimited, ServiceUnavailable, Unauthorized
from reasoning_agent.jobs import Runner
from reasoning_agent.keys import ApiKey
from reasoning_agent.ratelimit import Decision, RateLimiter, StoreUnavailable
from reasoning_agent.telemetry import span

__all__ = [
    "ApiKeyDep",
    "QueryLimitDep",
    "RunnerDep",
    "Services",
    "ServicesDep",
    "SessionDep",
    "TaskLimitDep",
    "document_api_key",
]


@dataclass(frozen=True, slots=True)
class Services:
    """What the lifespan builds once per process and every request shares."""

    settings: Settings
    database: Database
    limiter: RateLimiter
    agent: ReasoningAgent
    runner: Runner


async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


async def _runner(services: ServicesDep) -> Runner:
    return services.runner


async def _session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.database.sessions() as session:
        yield session


def _authenticated(request: Request) -> ApiKey:
    caller: ApiKey | None = getattr(request.state, "api_key", None)
    if caller is None:
        raise Unauthorized()
    return caller


async def _caller(request: Request) -> ApiKey:
    """The caller AuthMiddleware already checked. (The scheme is in OpenAPI through
    `document_api_key`: a Security dependency here would cost every request ~30 us.)"""
    return _authenticated(request)


RunnerDep = Annotated[Runner, Depends(_runner)]
SessionDep = Annotated[AsyncSession, Depends(_session)]

ApiKeyDep = Annotated[ApiKey, Depends(_caller)]


# The limits take what they need from the request rather than from other dependencies:
# FastAPI resolves each one per request, ~35 us apiece on the busiest route.
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
