"""The database schema: one table of tasks, indexed for the per-key listing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.attributes import set_committed_value

from reasoning_agent.tasks.status import ErrorType, TaskStatus

__all__ = ["Base", "Task", "UTCDateTime", "Usage"]

E = TypeVar("E", bound=StrEnum)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which keeps no offset) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _Enum(TypeDecorator[E]):
    """A StrEnum kept as its plain string, handed back as the enum."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum, self.length = enum, length  # named as the arguments, for the cache key

    def process_bind_param(self, value: E | None, dialect: Dialect) -> str | None:
        return None if value is None else str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    pass


class Task(Base):
    """One prompt and its answer, owned by the name of the API key that sent it."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[TaskStatus] = mapped_column(_Enum(TaskStatus, 16))
    prompt: Mapped[str | None] = mapped_column(Text)  # None with STORE_PROMPTS=false
    system: Mapped[str | None] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    prompt_chars: Mapped[int | None] = mapped_column(Integer)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    answer_chars: Mapped[int | None] = mapped_column(Integer)
    answer_sha256: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    temperature: Mapped[float | None] = mapped_column(Float)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    streamed: Mapped[bool] = mapped_column(Boolean, default=False)  # answered as events
    reasoning_effort: Mapped[str | None] = mapped_column(String(16))
    # Parameters asked for that the model does not take, so they were not sent.
    dropped_params: Mapped[list[str] | None] = mapped_column(JSON)
    reasoning: Mapped[str | None] = mapped_column(Text)  # the model's reasoning, beside the answer
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer)  # part of completion_tokens
    # What its key's token limits held for it before the call (None: no token limits).
    reserved_tokens: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error_type: Mapped[ErrorType | None] = mapped_column(_Enum(ErrorType, 64))
    error: Mapped[str | None] = mapped_column(Text)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Who works on an unfinished task, and until when that claim holds without renewal.
    holder: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    tries: Mapped[int] = mapped_column(Integer, default=0)  # background runs started

    __table_args__ = (
        Index("ix_tasks_owner_created", "owner", "created_at", "id"),
        Index("ux_tasks_owner_idempotency", "owner", "idempotency_key", unique=True),
        Index("ix_tasks_created", "created_at"),
        Index("ix_tasks_status_created", "status", "created_at"),
    )

    def show_unstored(
        self, *, prompt: str, system: str | None, answer: str, reasoning: str | None = None
    ) -> None:
        """Put texts that STORE_PROMPTS=false kept out of the database on this object only,
        for the caller's own answer; nothing marks them to be written."""
        texts = {"prompt": prompt, "system": system, "answer": answer, "reasoning": reasoning}
        for name, value in texts.items():
            set_committed_value(self, name, value)

    @property
    def usage(self) -> Usage | None:
        """The tokens the upstream reported, or None when it reported none."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return Usage(self.prompt_tokens, self.completion_tokens, self.reasoning_tokens)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None = None  # counted in completion_tokens already

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)
