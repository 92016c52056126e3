"""The states a task moves through and the kinds of failure it can end with."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorType", "TaskStatus"]


class TaskStatus(StrEnum):
    """`pending` while a request waits for its answer; `queued` then `running` in the
    background; then `completed`, `failed` or `cancelled`."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ErrorType(StrEnum):
    """Why a task has no answer; also the `type` of the error the API answers with."""

    UPSTREAM_ERROR = "upstream_error"
    CONNECTION_ERROR = "connection_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERRUPTED = "interrupted"
    STORE_ERROR = "store_error"
    CANCELLED = "cancelled"
