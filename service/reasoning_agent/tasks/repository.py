"""Keeping tasks: every read and write of the tasks table, each in a transaction of its own."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Executable,
    String,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.dml import UpdateBase

from reasoning_agent.llm.base import LLMResult
from reasoning_agent.storage.db import Database
from reasoning_agent.tasks.leases import LEASE_S, MAX_TRIES, QUEUE_CHECK_S, dead_here, holder_name
from reasoning_agent.tasks.models import Task
from reasoning_agent.tasks.status import ErrorType, TaskStatus

__all__ = [
    "InvalidCursor",
    "ModelTokens",
    "OutcomeNotStored",
    "Page",
    "Swept",
    "TaskRepository",
    "sha256",
    "storable",
]


class InvalidCursor(ValueError):
    """A cursor that this service did not make."""


class OutcomeNotStored(Exception):
    """A task's final write failed: refused by the database, or (`reachable` False) still
    unreachable after FINAL_WRITE_RETRY_S."""

    def __init__(self, cause: Exception, *, reachable: bool) -> None:
        super().__init__(cause.__class__.__name__)
        self.reachable = reachable


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ModelTokens:
    """What one model's tasks of one key used."""

    model: str
    tasks: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int  # part of completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Swept:
    """What a sweep did with the tasks of processes that are gone."""

    failed: int
    requeued: int  # running tasks put back in the queue
    resubmitted: int = 0  # queued tasks whose lost job was given to the runner again


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# What a database that is restarting or failing over raises; a retry may succeed.
_TRANSIENT = (OperationalError, InterfaceError, PoolTimeout, ConnectionError, socket.gaierror)
FINAL_WRITE_RETRY_S = 5.0
LEGACY_HORIZON = timedelta(hours=1)  # for unfinished rows written before leases existed
_UNFINISHED = (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING)
INTERRUPTED = "interrupted: the service stopped before the answer came"
GAVE_UP = f"interrupted: the processes running it stopped {MAX_TRIES} times"

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_COUNT = 2**31 - 1  # the token columns are 32-bit on PostgreSQL
_MODEL_CHARS = cast(String, Task.__table__.c.model.type).length or 200


def storable(text: str) -> str:
    """Text every database keeps as it is: NUL and lone surrogates become U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _count(value: int | None) -> int | None:
    return None if value is None else min(value, _MAX_COUNT)


# Built once: making a statement costs more than running it, and these run for every task.
_TASKS = cast(Table, Task.__table__)
_INSERT = insert(_TASKS)


@functools.cache
def _update(columns: tuple[str, ...], *, conditional: bool, held: bool) -> Update:
    stmt = update(_TASKS).where(_TASKS.c.id == bindparam("task_id"))
    if conditional:  # a cancellation in between wins
        stmt = stmt.where(_TASKS.c.status == bindparam("expect"))
    if held:  # and so does another process that took over a lease this one let lapse
        stmt = stmt.where(_TASKS.c.holder == bindparam("held_by"))
    return stmt.values({name: bindparam(name) for name in columns})


class TaskRepository:
    """The tasks of every owner; a task is only ever read back by the owner that made it.
    Unfinished tasks this process works on are leased in its name (`holder`)."""

    def __init__(
        self, database: Database, *, holder: str | None = None, lease_s: float = LEASE_S
    ) -> None:
        self._database = database
        self.holder = holder or holder_name()
        self.lease_s = lease_s

    async def create(
        self,
        *,
        owner: str,
        prompt: str,
        system: str | None,
        model: str,
        temperature: float | None,
        max_tokens: int | None,
        metadata: dict[str, str],
        digest: str,
        reasoning_effort: str | None = None,
        dropped_params: list[str] | None = None,
        streamed: bool = False,
        idempotency_key: str | None,
        trace_id: str | None,
        store_text: bool,
        status: TaskStatus,
        task_id: str | None = None,
        reserved_tokens: int | None = None,
    ) -> tuple[Task, bool]:
        """Store a new task (under `task_id` when given) and commit; with a known
        Idempotency-Key, the earlier task instead. True when the task is new."""
        if idempotency_key is not None:
            earlier = await self._by_idempotency_key(owner, idempotency_key)
            if earlier is not None:
                return earlier, False
        now = datetime.now(UTC)
        # A request holds its pending task; a queued one is the runner's, checked on later.
        pending = status is TaskStatus.PENDING
        values: dict[str, Any] = {
            "id": task_id or uuid.uuid4().hex,
            "owner": owner,
            "idempotency_key": idempotency_key,
            "request_hash": digest,
            "status": status,
            "prompt": prompt if store_text else None,
            "system": system if store_text else None,
            "prompt_chars": len(prompt),
            "prompt_sha256": sha256(prompt),
            "model": model,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "reasoning_effort": reasoning_effort,
            "dropped_params": dropped_params or None,
            "streamed": streamed,
            "metadata": metadata,
            "reserved_tokens": reserved_tokens,
            "attempts": 0,
            "trace_id": trace_id,
            "created_at": now,
            "holder": self.holder if pending else None,
            "lease_until": now + timedelta(seconds=self.lease_s if pending else QUEUE_CHECK_S),
            "started_at": None,
            "tries": 0,
        }
        try:
            await self._database.write(_INSERT, values)
        except IntegrityError:
            if idempotency_key is None:
                raise
            earlier = await self._by_idempotency_key(owner, idempotency_key)
            if earlier is None:
                raise
            return earlier, False
        values["metadata_"] = values.pop("metadata")
        return Task(**values), True

    async def complete(
        self,
        task: Task,
        result: LLMResult,
        *,
        latency_ms: float,
        store_text: bool,
        expect: TaskStatus | None = None,
    ) -> bool:
        """Record the answer, made storable (an upstream's bytes must not lose a paid answer);
        with `expect`, only if the task is still in that status (and, running, ours)."""
        answer = storable(result.answer)
        reasoning = storable(result.reasoning) if result.reasoning is not None else None
        values = {
            "status": TaskStatus.COMPLETED,
            "answer": answer if store_text else None,
            "answer_chars": len(answer),
            "answer_sha256": sha256(answer),
            "reasoning": reasoning if store_text else None,
            "model": storable(result.model)[:_MODEL_CHARS],
            "prompt_tokens": _count(result.prompt_tokens),
            "completion_tokens": _count(result.completion_tokens),
            "reasoning_tokens": _count(result.reasoning_tokens),
            "attempts": result.attempts,
            "latency_ms": latency_ms,
            "completed_at": datetime.now(UTC),
        }
        return await self._finish(task, values, expect)

    async def fail(
        self,
        task: Task,
        *,
        error_type: ErrorType,
        message: str,
        attempts: int,
        latency_ms: float,
        expect: TaskStatus | None = None,
        partial: str | None = None,
        store_text: bool = True,
    ) -> bool:
        """Record why there is no answer (and the `partial` answer a broken stream passed
        on, which is paid for); with `expect`, only if the task is still in that status (and,
        running, ours)."""
        values: dict[str, Any] = {
            "status": TaskStatus.FAILED,
            "error_type": error_type,
            "error": message,
            "attempts": attempts,
            "latency_ms": latency_ms,
            "completed_at": datetime.now(UTC),
        }
        if partial:
            partial = storable(partial)
            values["answer"] = partial if store_text else None
            values["answer_chars"] = len(partial)
            values["answer_sha256"] = sha256(partial)
        return await self._finish(task, values, expect)

    async def _finish(self, task: Task, values: dict[str, Any], expect: TaskStatus | None) -> bool:
        params = {**values, "task_id": task.id}
        held = expect is TaskStatus.RUNNING
        if expect is not None:
            params["expect"] = expect
        if held:
            params["held_by"] = self.holder
        statement = _update(tuple(values), conditional=expect is not None, held=held)
        try:
            try:
                changed = await self._database.write(statement, params)
            except _TRANSIENT:
                changed = await self._write_again(statement, params)
        except _TRANSIENT as exc:
            raise OutcomeNotStored(exc, reachable=False) from exc
        except (StatementError, OSError) as exc:  # the database refused it
            raise OutcomeNotStored(exc, reachable=True) from exc
        if changed:
            for name, value in values.items():
                set_committed_value(task, name, value)
        return bool(changed)

    async def _write_again(self, statement: UpdateBase, params: dict[str, Any]) -> int:
        """Retry an outcome's write through a database that blinked: the answer it records is
        already paid for. Raises the last error after FINAL_WRITE_RETRY_S."""
        give_up, pause = time.monotonic() + FINAL_WRITE_RETRY_S, 0.1
        while True:
            await asyncio.sleep(pause)
            try:
                return await self._database.write(statement, params)
            except _TRANSIENT:
                if time.monotonic() + pause >= give_up:
                    raise
                pause = min(pause * 2, 1.0)

    async def claim(self, task_id: str) -> Task | None:
        """Take a background task to run: a queued one, or a running one whose holder let its
        lease lapse. None if it is cancelled, finished, or held by a live process."""
        now = datetime.now(UTC)
        async with self._database.sessions() as session:
            result = await session.execute(
                update(Task)
                .where(
                    Task.id == task_id,
                    or_(
                        Task.status == TaskStatus.QUEUED,
                        and_(Task.status == TaskStatus.RUNNING, _lapsed(now)),
                    ),
                )
                .values(
                    status=TaskStatus.RUNNING,
                    holder=self.holder,
                    lease_until=now + timedelta(seconds=self.lease_s),
                    started_at=now,
                    tries=Task.tries + 1,
                )
            )
            await session.commit()
            if not _rowcount(result):
                return None
            return await session.get(Task, task_id, populate_existing=True)

    async def renew(self, task_ids: list[str]) -> set[str]:
        """Extend this process's leases on these tasks; the ones it still holds (not those
        cancelled or taken over meanwhile)."""
        async with self._database.sessions() as session:
            held = await session.scalars(
                update(Task)
                .where(
                    Task.id.in_(task_ids),
                    Task.holder == self.holder,
                    Task.status.in_((TaskStatus.PENDING, TaskStatus.RUNNING)),
                )
                .values(lease_until=datetime.now(UTC) + timedelta(seconds=self.lease_s))
                .returning(Task.id)
            )
            renewed = set(held)
            await session.commit()
        return renewed

    async def cancel(
        self,
        owner: str,
        task_id: str,
        *,
        statuses: tuple[TaskStatus, ...] = (TaskStatus.QUEUED, TaskStatus.RUNNING),
    ) -> bool:
        """Cancel the owner's task if it is in one of `statuses` (by default queued or
        running; a pending one only if it is streamed: a plain request is not cancelled
        under its caller); False if it was not."""
        pending_ok = or_(Task.status != TaskStatus.PENDING, Task.streamed.is_(True))
        changed = await self._commit_rows(
            update(Task)
            .where(
                Task.id == task_id,
                Task.owner == owner,
                Task.status.in_(statuses),
                pending_ok,
            )
            .values(
                status=TaskStatus.CANCELLED,
                error_type=ErrorType.CANCELLED,
                error="cancelled by the caller",
                completed_at=datetime.now(UTC),
            )
        )
        return bool(changed)

    async def requeue(self, task_ids: list[str]) -> int:
        """Put this process's running tasks back in the queue (it is stopping); how many."""
        if not task_ids:
            return 0
        return await self._commit_rows(
            update(Task)
            .where(
                Task.id.in_(task_ids),
                Task.status == TaskStatus.RUNNING,
                Task.holder == self.holder,
            )
            .values(status=TaskStatus.QUEUED, holder=None, lease_until=datetime.now(UTC))
        )

    async def sweep(self) -> Swept:
        """Free the tasks of processes that are gone (lease lapsed, or dead on this host): a
        request's pending task fails, since its caller is gone with it; a background one is
        queued again, due for a runner at once, until it has been tried MAX_TRIES times."""
        now = datetime.now(UTC)
        async with self._database.sessions() as session:
            holders = await session.scalars(
                select(Task.holder)
                .where(Task.status.in_(_UNFINISHED), Task.holder.is_not(None))
                .distinct()
            )
            dead = [h for h in holders if h is not None and dead_here(h, me=self.holder)]
            freed = or_(_lapsed(now), Task.holder.in_(dead))
            failed = 0
            for which, message in (
                (Task.status == TaskStatus.PENDING, INTERRUPTED),
                (and_(Task.status == TaskStatus.RUNNING, Task.tries >= MAX_TRIES), GAVE_UP),
            ):
                result = await session.execute(
                    update(Task)
                    .where(freed, which)
                    .values(
                        status=TaskStatus.FAILED,
                        error_type=ErrorType.INTERRUPTED,
                        error=message,
                        holder=None,
                        completed_at=now,
                    )
                )
                failed += _rowcount(result)
            requeued = _rowcount(
                await session.execute(
                    update(Task)
                    .where(freed, Task.status == TaskStatus.RUNNING)
                    .values(status=TaskStatus.QUEUED, holder=None, lease_until=now)
                )
            )
            await session.execute(  # queued before leases existed: due for a check now
                update(Task)
                .where(Task.status == TaskStatus.QUEUED, Task.lease_until.is_(None))
                .values(lease_until=now)
            )
            await session.commit()
        return Swept(failed=failed, requeued=requeued)

    async def due_queued(self, *, limit: int) -> list[tuple[str, int]]:
        """Queued tasks whose job is due to be looked for in the runner, with their tries."""
        stmt = (
            select(Task.id, Task.tries)
            .where(Task.status == TaskStatus.QUEUED, Task.lease_until <= datetime.now(UTC))
            .order_by(Task.lease_until)
            .limit(limit)
        )
        async with self._database.sessions() as session:
            return [(task_id, tries) for task_id, tries in (await session.execute(stmt)).all()]

    async def check_later(self, task_ids: list[str]) -> int:
        """Look for these queued tasks' jobs again in QUEUE_CHECK_S."""
        if not task_ids:
            return 0
        return await self._commit_rows(
            update(Task)
            .where(Task.id.in_(task_ids), Task.status == TaskStatus.QUEUED)
            .values(lease_until=datetime.now(UTC) + timedelta(seconds=QUEUE_CHECK_S))
        )

    async def give_up(self, task_ids: list[str]) -> list[tuple[str, str, int | None]]:
        """Fail queued tasks that have used up their tries; the id, owner and reserved
        tokens of each."""
        if not task_ids:
            return []
        async with self._database.sessions() as session:
            failed = await session.execute(
                update(Task)
                .where(Task.id.in_(task_ids), Task.status == TaskStatus.QUEUED)
                .values(
                    status=TaskStatus.FAILED,
                    error_type=ErrorType.INTERRUPTED,
                    error=GAVE_UP,
                    completed_at=datetime.now(UTC),
                )
                .returning(Task.id, Task.owner, Task.reserved_tokens)
            )
            rows = [(task_id, owner, reserved) for task_id, owner, reserved in failed]
            await session.commit()
        return rows

    async def delete_older_than(self, cutoff: datetime, *, batch: int) -> int:
        """Delete up to `batch` tasks created before `cutoff`; how many went."""
        ids = select(Task.id).where(Task.created_at < cutoff).limit(batch).scalar_subquery()
        return await self._commit_rows(delete(Task).where(Task.id.in_(ids)))

    async def get(self, owner: str, task_id: str) -> Task | None:
        """The task, only if it belongs to `owner`."""
        async with self._database.sessions() as session:
            task = await session.get(Task, task_id)
        return task if task is not None and task.owner == owner else None

    async def tokens_by_model(self, owner: str, *, since: datetime) -> list[ModelTokens]:
        """The tokens `owner`'s tasks created since `since` used, by model."""
        stmt = (
            select(
                Task.model,
                func.count(),
                func.coalesce(func.sum(Task.prompt_tokens), 0),
                func.coalesce(func.sum(Task.completion_tokens), 0),
                func.coalesce(func.sum(Task.reasoning_tokens), 0),
            )
            .where(Task.owner == owner, Task.created_at >= since)
            .group_by(Task.model)
            .order_by(Task.model)
        )
        async with self._database.sessions() as session:
            rows = (await session.execute(stmt)).all()
        return [
            ModelTokens(model, int(tasks), prompt or 0, completion or 0, reasoning or 0)
            for model, tasks, prompt, completion, reasoning in rows
        ]

    async def unfinished_ids(self, *, statuses: tuple[TaskStatus, ...]) -> list[str]:
        stmt = select(Task.id).where(Task.status.in_(statuses)).order_by(Task.created_at)
        async with self._database.sessions() as session:
            return list((await session.scalars(stmt)).all())

    async def query(
        self,
        owner: str,
        *,
        text: str | None = None,
        status: TaskStatus | None = None,
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
        async with self._database.sessions() as session:
            rows = list((await session.scalars(stmt)).all())
        more = len(rows) > limit
        items = rows[:limit]
        return Page(items=items, next_cursor=encode_cursor(items[-1]) if more else None)

    async def _by_idempotency_key(self, owner: str, key: str) -> Task | None:
        stmt = select(Task).where(Task.owner == owner, Task.idempotency_key == key)
        async with self._database.sessions() as session:
            return (await session.scalars(stmt)).first()

    async def _commit_rows(self, statement: Executable) -> int:
        """Run one UPDATE or DELETE and commit; how many rows it changed."""
        async with self._database.sessions() as session:
            result = await session.execute(statement)
            await session.commit()
        return _rowcount(result)


def _lapsed(now: datetime) -> Any:
    """A lease nobody renewed in time; rows from before leases get LEGACY_HORIZON."""
    return or_(
        Task.lease_until < now,
        and_(Task.lease_until.is_(None), Task.created_at < now - LEGACY_HORIZON),
    )


def _rowcount(result: Any) -> int:
    return int(result.rowcount or 0)


def encode_cursor(task: Task) -> str:
    raw = f"{task.created_at.astimezone(UTC).isoformat()}|{task.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Undo encode_cursor; anything else raises InvalidCursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, task_id = raw.split("|")
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None:
            raise ValueError("no offset")
        created_at = created_at.astimezone(UTC)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise InvalidCursor("cursor is not one this service returned") from None
    if len(task_id) != 32 or not task_id.isalnum():
        raise InvalidCursor("cursor is not one this service returned")
    return created_at, task_id
