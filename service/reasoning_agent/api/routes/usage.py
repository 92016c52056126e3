"""GET /usage: what a key has spent against its token limits, and by model today."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from reasoning_agent.api.deps import ApiKeyDep, QueryLimitDep, ServicesDep
from reasoning_agent.errors import Forbidden, error_responses
from reasoning_agent.windows import WindowKind

__all__ = ["router"]

router = APIRouter(responses=error_responses(400, 401, 414, 422, 503))


class WindowOut(BaseModel):
    kind: WindowKind
    window: str = Field(description="its length, e.g. `1 day`; windows are fixed, in UTC")
    limit: int
    used: int = Field(description="tokens charged: the upstream's reported usage")
    reserved: int = Field(description="tokens held for calls not yet settled")
    remaining: int
    reset: datetime = Field(description="when the window starts anew")


class ModelUsageOut(BaseModel):
    model: str
    tasks: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = Field(description="part of completion_tokens")
    total_tokens: int


class UsageOut(BaseModel):
    key: str
    windows: list[WindowOut] = Field(description="the key's token limits; empty without any")
    since: datetime = Field(description="the start of the current UTC day")
    models: list[ModelUsageOut] = Field(description="tokens of the key's tasks since `since`")


@router.get(
    "/usage",
    response_model=UsageOut,
    summary="The caller's token windows and its tokens by model today",
    responses=error_responses(403, 429),
)
async def read_usage(
    caller: ApiKeyDep,
    _: QueryLimitDep,
    services: ServicesDep,
    key: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=r"^[\x21-\x7e]+$",
            description="another key's name (keys named in ADMIN_KEYS only)",
        ),
    ] = None,
) -> UsageOut:
    name = caller.name if key is None else key
    if name != caller.name and caller.name not in services.settings.admin_names:
        raise Forbidden("?key= is for the keys named in ADMIN_KEYS")
    windows = await services.quota.windows(name)
    since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    models = await services.tasks.tokens_by_model(name, since=since)
    return UsageOut(
        key=name,
        windows=[
            WindowOut(
                kind=state.window.kind,
                window=f"{state.window.item.multiples} {state.window.item.GRANULARITY.name}",
                limit=state.limit,
                used=state.used,
                reserved=state.reserved,
                remaining=state.remaining,
                reset=datetime.fromtimestamp(state.reset_at, UTC),
            )
            for state in windows
        ],
        since=since,
        models=[
            ModelUsageOut(
                model=m.model,
                tasks=m.tasks,
                prompt_tokens=m.prompt_tokens,
                completion_tokens=m.completion_tokens,
                reasoning_tokens=m.reasoning_tokens,
                total_tokens=m.total_tokens,
            )
            for m in models
        ],
    )
