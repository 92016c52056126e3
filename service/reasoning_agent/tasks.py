"""Storing tasks: pending before the LLM is called, final after; listing them by keyset cursor."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Executable,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from reasoning_agent.db import Database
from reasoning_agent.llm import LLMResult
from reasoning_agent.models import Task, TaskStatus
from reasoning_agent.schemas import TaskIn

__all__ = [
    "InvalidCursor",
    "Page",
    "cancel",
    "claim",
    "create_pending",
    "delete_older_than",
    "fail_interrupted",
    "get_task",
    "mark_completed",
    "mark_failed",
    "query_tasks",
    "request_hash",
    "unfinished_ids",
]


class InvalidCursor(ValueError):
    """A cursor that this service did not make."""


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Task]
    next_cursor: str | None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_hash(body: TaskIn, model: str) -> str:
    """A digest of what was asked, so an Idempotency-Key reused for another request is caught."""
    canonical = json.dumps({**body.model_dump(), "model": model}, sort_keys=True)
    return _sha256(canonical)


async def create_pending(
    database: Database,
    *,
    owner: str,
    body: TaskIn,
    model: str,
    digest: str,
    idempotency_key: str | None,
    trace_id: str | None = None,
    store_text: bool = True,
    status: str = TaskStatus.PENDING,
) -> tuple[Task, bool]:
    """Store the task (`pending`, or `queued` for the background) and commit before the LLM is
    called; with a known Idempotency-Key, return the earlier task instead."""
    if idempotency_key is not None:
        async with database.sessions() as session:
            earlier = await _by_idempotency_key(session, owner, idempotency_key)
        if earlier is not None:
            return earlier, False
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "owner": owner,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "status": status,
        "prompt": body.prompt if store_text else None,
        "system": body.system if store_text else None,
        "prompt_chars": len(body.prompt),
        "prompt_sha256": _sha256(body.prompt),
        "model": model,
        "temperature": body.temperature,
        "max_tokens": body.max_tokens,
        "metadata": dict(body.metadata),
        "attempts": 0,
        "trace_id": trace_id,
        "created_at": datetime.now(UTC),
    }
    try:
        await database.write(_INSERT, values)
    except IntegrityError:
        if idempotency_key is None:
            raise
        async with database.sessions() as session:
            earlier = await _by_idempotency_key(session, owner, idempotency_key)
        if earlier is None:
            raise
        return earlier, False
    values["metadata_"] = values.pop("metadata")
    return Task(**values), True


async def mark_completed(
    database: Database,
    task: Task,
    result: LLMResult,
    *,
    latency_ms: float,
    store_text: bool = True,
    expect: str | None = None,
) -> bool:
    """Record the answer; with `expect`, only if the task is still in that status."""
    values = {
        "status": TaskStatus.COMPLETED,
        "answer": result.answer if store_text else None,
        "answer_chars": len(result.answer),
        "answer_sha256": _sha256(result.answer),
        "model": result.model,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "attempts": result.attempts,
        "latency_ms": latency_ms,
        "completed_at": datetime.now(UTC),
    }
    return await _finish(database, task, values, expect)


async def mark_failed(
    database: Database,
    task: Task,
    *,
    error_type: str,
    message: str,
    attempts: int,
    latency_ms: float,
    expect: str | None = None,
) -> bool:
    """Record why there is no answer; with `expect`, only if the task is still in that status."""
    values = {
        "status": TaskStatus.FAILED,
        "error_type": error_type,
        "error": message,
        "attempts": attempts,
        "latency_ms": latency_ms,
        "completed_at": datetime.now(UTC),
    }
    return await _finish(database, task, values, expect)


# Built once: making a statement costs more than running it (both on the path of every task).
_TASKS = cast(Table, Task.__table__)
_INSERT = insert(_TASKS)


@functools.cache
def _update(columns: tuple[str, ...], *, conditional: bool) -> Update:
    stmt = update(_TASKS).where(_TASKS.c.id == bindparam("task_id"))
    if conditional:  # a cancellation in between wins
        stmt = stmt.where(_TASKS.c.status == bindparam("expect"))
    return stmt.values({name: bindparam(name) for name in columns})


async def _finish(
    database: Database, task: Task, values: dict[str, Any], expect: str | None
) -> bool:
    params = {**values, "task_id": task.id}
    if expect is not None:
        params["expect"] = expect
    changed = await database.write(_update(tuple(values), conditional=expect is not None), params)
    if changed:
        for name, value in values.items():
            set_committed_value(task, name, value)
    return bool(changed)


async def _commit_rows(session: AsyncSession, statement: Executable) -> int:
    """Run one UPDATE or DELETE and commit; how many rows it changed."""
    result = await session.execute(statement)
    await session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def claim(session: AsyncSession, task_id: str, *, statuses: tuple[str, ...]) -> Task | None:
    """Move a task to `running` if it is in one of `statuses`; None if someone else has it."""
    changed = await _commit_rows(
        session,
        update(Task)
        .where(Task.id == task_id, Task.status.in_(statuses))
        .values(status=TaskStatus.RUNNING),
    )
    return await session.get(Task, task_id, populate_existing=True) if changed else None


async def cancel(session: AsyncSession, owner: str, task_id: str) -> bool:
    """Cancel the owner's task if it is queued or running; False if it had already ended."""
    changed = await _commit_rows(
        session,
        update(Task)
        .where(
            Task.id == task_id,
            Task.owner == owner,
            Task.status.in_((TaskStatus.QUEUED, TaskStatus.RUNNING)),
        )
        .values(
            status=TaskStatus.CANCELLED,
            error_type="cancelled",
            error="cancelled by the caller",
            completed_at=datetime.now(UTC),
        ),
    )
    return bool(changed)


async def unfinished_ids(session: AsyncSession, *, statuses: tuple[str, ...]) -> list[str]:
    stmt = select(Task.id).where(Task.status.in_(statuses)).order_by(Task.created_at)
    return list((await session.scalars(stmt)).all())


async def delete_older_than(session: AsyncSession, cutoff: datetime, *, batch: int) -> int:
    """Delete up to `batch` tasks created before `cutoff`; how many went."""
    ids = select(Task.id).where(Task.created_at < cutoff).limit(batch).scalar_subquery()
    return await _commit_rows(session, delete(Task).where(Task.id.in_(ids)))


async def fail_interrupted(
    session: AsyncSession, *, pending_after: timedelta, running_after: timedelta
) -> int:
    """Fail tasks unfinished for longer than any live process could take: theirs is gone."""
    now = datetime.now(UTC)
    return await _commit_rows(
        session,
        update(Task)
        .where(
            or_(
                and_(Task.status == TaskStatus.PENDING, Task.created_at < now - pending_after),
                and_(Task.status == TaskStatus.RUNNING, Task.created_at < now - running_after),
            )
        )
        .values(
            status=TaskStatus.FAILED,
            error_type="interrupted",
            error="interrupted: the service stopped before the answer came",
            completed_at=now,
        ),
    )


async def get_task(session: AsyncSession, owner: str, task_id: str) -> Task | None:
    """The task, only if it belongs to `owner`."""
    task = await session.get(Task, task_id)
    return task if task is not None and task.owner == owner else None


async def query_tasks(
    session: AsyncSession,
    owner: str,
    *,
    text: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> Page:
    """The owner's tasks, newest first, one page after `cursor`."""
    stmt = select(Task).where(Task.owner == owner)
    if status is not None:
        stmt = stmt.where(Task.status == status)
    if since is not None:
        stmt = stmt.where(Task.created_at >= since)
    if until is not None:
        stmt = stmt.where(Task.created_at < until)
    if text:
        stmt = stmt.where(
            or_(
                Task.prompt.icontains(text, autoescape=True),
                Task.answer.icontains(text, autoescape=True),
            )
        )
    if cursor is not None:
        created_at, task_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                Task.created_at < created_at,
                and_(Task.created_at == created_at, Task.id < task_id),
            )
        )
    stmt = stmt.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
    rows = list((await session.scalars(stmt)).all())
    more = len(rows) > limit
    items = rows[:limit]
    return Page(items=items, next_cursor=encode_cursor(items[-1]) if more else None)


def encode_cursor(task: Task) -> str:
    raw = f"{task.created_at.astimezone(UTC).isoformat()}|{task.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Undo encode_cursor; anything else raises InvalidCursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, task_id = raw.split("|")
        created_at = datetime.fromisoformat(stamp)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("cursor is not one this service returned") from None
    if created_at.tzinfo is None or len(task_id) != 32 or not task_id.isalnum():
        raise InvalidCursor("cursor is not one this service returned")
    return created_at, task_id


async def _by_idempotency_key(session: AsyncSession, owner: str, key: str) -> Task | None:
    stmt = select(Task).where(Task.owner == owner, Task.idempotency_key == key)
    return (await session.scalars(stmt)).first()
