"""Dependencies as Annotated aliases, so a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response, Security
from fastapi.security import APIKeyHeader
from limits import RateLimitItem
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


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def _caller(request: Request, _: Annotated[str | None, Security(_api_key_header)]) -> ApiKey:
    """The caller AuthMiddleware already checked (declared here so OpenAPI shows the scheme)."""
    caller: ApiKey | None = getattr(request.state, "api_key", None)
    if caller is None:
        raise Unauthorized()
    return caller


RunnerDep = Annotated[Runner, Depends(_runner)]
SessionDep = Annotated[AsyncSession, Depends(_session)]

ApiKeyDep = Annotated[ApiKey, Depends(_caller)]


async def _limit(
    scope: str,
    items: list[RateLimitItem],
    services: Services,
    caller: ApiKey,
    response: Response,
) -> Decision:
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


async def _task_limit(services: ServicesDep, caller: ApiKeyDep, response: Response) -> Decision:
    return await _limit("task", services.settings.rate_limits, services, caller, response)


async def _query_limit(services: ServicesDep, caller: ApiKeyDep, response: Response) -> Decision:
    return await _limit("query", services.settings.query_rate_limits, services, caller, response)


TaskLimitDep = Annotated[Decision, Depends(_task_limit)]
QueryLimitDep = Annotated[Decision, Depends(_query_limit)]
