"""The JSON the task routes take and give, with the limits that keep bad input out of the database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator

from reasoning_agent.tasks.models import Task
from reasoning_agent.tasks.status import TaskStatus

__all__ = ["Moment", "TaskIn", "TaskList", "TaskOut", "Usage"]


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


def _iso_8601_utc(value: object) -> datetime:
    """An ISO 8601 date-time (not a Unix time, which pydantic would also take), in UTC;
    without an offset it is taken as UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("expected an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z") from None
    else:
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


# A query's time bound: documented as `date-time`, and only that is accepted.
Moment = Annotated[datetime, PlainValidator(_iso_8601_utc, json_schema_input_type=datetime)]


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
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    mode: Literal["sync", "async"] = "sync"
    stream: bool = False  # answer with Server-Sent Events as the answer arrives


class Usage(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    reasoning_tokens: int | None  # part of completion_tokens, not added to the total again


class TaskOut(BaseModel):
    """A stored task as the API shows it, read straight off the Task's attributes."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    owner: str = Field(description="the API key's name, or `oidc:` and a bearer token's principal")
    status: TaskStatus
    prompt: str | None
    system: str | None
    answer: str | None
    reasoning: str | None
    prompt_chars: int | None
    prompt_sha256: str | None
    answer_chars: int | None
    answer_sha256: str | None
    model: str
    temperature: float | None
    max_tokens: int | None
    reasoning_effort: str | None
    dropped_params: Annotated[list[str], BeforeValidator(lambda value: value or [])] = Field(
        description="parameters asked for that the model does not take, so not sent"
    )
    metadata: dict[str, str] = Field(validation_alias="metadata_")
    usage: Usage | None
    reserved_tokens: int | None = Field(
        description="tokens its key's token limits reserved for it before the call"
    )
    attempts: int
    latency_ms: float | None
    created_at: datetime
    completed_at: datetime | None
    error: str | None
    trace_id: str | None

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        return cls.model_validate(task)


class TaskList(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None
