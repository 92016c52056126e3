"""The JSON the API takes and gives, with the limits that keep bad input out of the database."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from reasoning_agent.models import Task

__all__ = ["ErrorOut", "HealthOut", "TaskIn", "TaskList", "TaskOut", "Usage", "error_responses"]


def _storable(value: str) -> str:
    """Text every database can store: no NUL, no lone surrogate."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Field(pattern=NO_NUL), AfterValidator(_storable)]
MetaKey = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_storable)]
MetaValue = Annotated[str, Field(max_length=1024), AfterValidator(_storable)]


class TaskIn(BaseModel):
    """A prompt to answer; the length cap on `prompt` is MAX_PROMPT_CHARS, checked by the route."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[
        str,
        Field(min_length=1, pattern=r"^[^\x00]*\S[^\x00]*$"),
        AfterValidator(_storable),
        AfterValidator(_not_blank),
    ]
    model: Annotated[Text, Field(min_length=1, max_length=200)] | None = None
    system: Text | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    metadata: Annotated[dict[MetaKey, MetaValue], Field(max_length=32)] = Field(
        default_factory=dict
    )
    mode: Literal["sync", "async"] = "sync"


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


class TaskOut(BaseModel):
    """A stored task as the API shows it."""

    id: str
    status: Literal["pending", "queued", "running", "completed", "failed", "cancelled"]
    prompt: str | None
    system: str | None
    answer: str | None
    prompt_chars: int | None
    prompt_sha256: str | None
    answer_chars: int | None
    answer_sha256: str | None
    model: str
    temperature: float | None
    max_tokens: int | None
    metadata: dict[str, str]
    usage: Usage | None
    attempts: int
    latency_ms: float | None
    created_at: datetime
    completed_at: datetime | None
    error: str | None
    trace_id: str | None

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        usage = None
        if task.prompt_tokens is not None or task.completion_tokens is not None:
            total = (task.prompt_tokens or 0) + (task.completion_tokens or 0)
            usage = Usage(
                prompt_tokens=task.prompt_tokens,
                completion_tokens=task.completion_tokens,
                total_tokens=total,
            )
        return cls(
            id=task.id,
            status=task.status,
            prompt=task.prompt,
            system=task.system,
            answer=task.answer,
            prompt_chars=task.prompt_chars,
            prompt_sha256=task.prompt_sha256,
            answer_chars=task.answer_chars,
            answer_sha256=task.answer_sha256,
            model=task.model,
            temperature=task.temperature,
            max_tokens=task.max_tokens,
            metadata=task.metadata_,
            usage=usage,
            attempts=task.attempts,
            latency_ms=task.latency_ms,
            created_at=task.created_at,
            completed_at=task.completed_at,
            error=task.error,
            trace_id=task.trace_id,
        )


class TaskList(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


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
    401: "Missing or unknown X-API-Key",
    404: "No such task for this key",
    409: "The same Idempotency-Key is still in progress",
    413: "Body or prompt too large",
    414: "Query string too long",
    422: "Invalid input",
    429: "Rate limit exceeded (see Retry-After)",
    502: "The LLM upstream failed",
    503: "Database, rate-limit store or LLM provider unavailable",
    504: "The LLM deadline passed",
}


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "fail"]
    checks: dict[str, Any]
