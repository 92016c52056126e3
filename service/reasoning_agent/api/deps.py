"""Dependencies as Annotated aliases, so a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response

from reasoning_agent.errors import Unauthorized
from reasoning_agent.keys import ApiKey
from reasoning_agent.ratelimit import Decision
from reasoning_agent.services import Services
from reasoning_agent.tasks.service import TaskService

__all__ = [
    "ApiKeyDep",
    "QueryLimitDep",
    "ServicesDep",
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


# The query limit, too, takes what it needs from the request rather than from other
# dependencies. (A task's request limit is checked with its tokens, by the task service.)
async def _query_limit(request: Request, response: Response) -> Decision:
    services: Services = request.app.state.services
    decision = await services.quota.check_queries(_authenticated(request).name)
    response.headers.update(decision.headers)
    return decision


def document_api_key(app: FastAPI, *, public: frozenset[str], bearer: bool = False) -> None:
    """Declare the X-API-Key scheme in OpenAPI (and, with `bearer`, bearer tokens as the
    other way in) on every operation but the `public` paths."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["APIKeyHeader"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            either: list[dict[str, list[str]]] = [{"APIKeyHeader": []}]
            if bearer:
                schemes["BearerToken"] = {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "a JWT from the OIDC_ISSUER, for the OIDC_AUDIENCE",
                }
                either.append({"BearerToken": []})
            for path, operations in schema["paths"].items():
                if path not in public:
                    for operation in operations.values():
                        operation["security"] = either
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


QueryLimitDep = Annotated[Decision, Depends(_query_limit)]
