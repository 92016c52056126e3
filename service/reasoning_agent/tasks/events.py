"""A task's events (`task`, `delta`, `done`, `error`), kept a while so a client can follow a
task and pick up where its connection dropped: in memory for the tasks this process runs, and
with Redis in a stream per task, so any process can follow a task any other one runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["END_KINDS", "EventLog", "Kind", "SharedEventLog", "TaskEvent"]

log = logging.getLogger(__name__)

Kind = Literal["task", "delta", "done", "error"]
END_KINDS = frozenset({"done", "error"})
MAX_EVENTS = 100_000  # per task: a runaway upstream cannot fill the memory or Redis


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One event of a task; `id` increases by one within the task, from 1."""

    id: int
    kind: Kind
    data: dict[str, Any]

    @property
    def ends(self) -> bool:
        return self.kind in END_KINDS


@dataclass
class _Log:
    events: list[TaskEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    expires: float | None = None  # once ended


class EventLog:
    """The events of the tasks this process runs, in memory, for `ttl_s` after each ends."""

    def __init__(self, *, ttl_s: float = 600.0) -> None:
        self._logs: dict[str, _Log] = {}
        # The ended logs in the order they expire (one ttl for all): expiring looks at the
        # oldest only, not at every log kept.
        self._ended: deque[tuple[float, str]] = deque()
        self.ttl_s = ttl_s

    async def has(self, task_id: str) -> bool:
        return task_id in self._logs

    async def publish(self, task_id: str, kind: Kind, data: dict[str, Any]) -> TaskEvent:
        """Add the next event of `task_id` and wake its followers."""
        log = self._logs.get(task_id)
        if log is None:
            self._expire()
            log = self._logs[task_id] = _Log()
        event = TaskEvent(len(log.events) + 1, kind, data)
        if len(log.events) < MAX_EVENTS or event.ends:
            log.events.append(event)
        if event.ends:
            log.expires = time.monotonic() + self.ttl_s
            self._ended.append((log.expires, task_id))
        log.changed.set()
        log.changed = asyncio.Event()
        return event

    async def follow(self, task_id: str, *, after: int = 0) -> AsyncIterator[TaskEvent]:
        """The events after `after`, then each new one, until the task's last; nothing for a
        task this log does not have."""
        log = self._logs.get(task_id)
        if log is None:
            return
        seen = after
        while True:
            fresh = log.events[seen:]
            for event in fresh:
                yield event
                if event.ends:
                    return
            seen += len(fresh)
            await log.changed.wait()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._ended and self._ended[0][0] < now:
            _, task_id = self._ended.popleft()
            log = self._logs.get(task_id)
            if log is not None and log.expires is not None and log.expires < now:
                del self._logs[task_id]

    async def aclose(self) -> None:
        return None


class SharedEventLog(EventLog):
    """As EventLog, and every event also in the Redis stream `ra:events:{task_id}` (entry id
    `0-{event id}`, at most MAX_EVENTS, expiring `ttl_s` after the last event), which followers
    of tasks run elsewhere read. Redis failing never fails a task: its own process's
    followers still get everything."""

    BLOCK_MS = 5000  # how long one read waits for news before checking the stream still exists
    GATHER_S = 0.02  # how long the writer gathers events before it writes them in one round trip

    def __init__(self, redis_url: str, *, ttl_s: float = 600.0) -> None:
        super().__init__(ttl_s=ttl_s)
        self._redis = Redis.from_url(redis_url)
        self._warned = False
        # Events go to Redis from one writer, in batches: publishing never waits on Redis,
        # and the pieces that came while a batch was written go in one round trip.
        self._unsent: list[tuple[str, TaskEvent]] = []
        self._news = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def has(self, task_id: str) -> bool:
        if await super().has(task_id):
            return True
        try:
            return bool(await self._redis.exists(_key(task_id)))
        except RedisError as exc:
            log.warning("task events: Redis did not answer: %s", exc.__class__.__name__)
            return False

    async def publish(self, task_id: str, kind: Kind, data: dict[str, Any]) -> TaskEvent:
        event = await super().publish(task_id, kind, data)
        self._unsent.append((task_id, event))
        self._news.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_forever(), name="task events to Redis")
        return event

    async def _write_forever(self) -> None:
        while not self._closing:
            await self._news.wait()
            await asyncio.sleep(self.GATHER_S)
            self._news.clear()
            await self._write()

    async def _write(self) -> None:
        batch, self._unsent = self._unsent, []
        if not batch:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id, event in batch:
                    fields = {
                        "kind": event.kind,
                        "data": json.dumps(event.data, separators=(",", ":")),
                    }
                    pipe.xadd(_key(task_id), fields, id=f"0-{event.id}", maxlen=MAX_EVENTS)
                for task_id in {task_id for task_id, _ in batch}:
                    pipe.expire(_key(task_id), max(1, round(self.ttl_s)))
                await pipe.execute()
            self._warned = False
        except RedisError as exc:
            if not self._warned:  # once per outage, not once per piece
                log.warning("task events not shared: Redis failed: %s", exc.__class__.__name__)
                self._warned = True

    async def follow(self, task_id: str, *, after: int = 0) -> AsyncIterator[TaskEvent]:
        if await super().has(task_id):
            async for event in super().follow(task_id, after=after):
                yield event
            return
        key, seen = _key(task_id), after
        while True:
            try:
                replies = await self._redis.xread(
                    {key: f"0-{seen}"}, count=500, block=self.BLOCK_MS
                )
                if not replies and not await self._redis.exists(key):
                    return  # expired, or never written: the caller falls back to the database
            except RedisError as exc:
                log.warning("task events: Redis failed: %s", exc.__class__.__name__)
                return
            for _, entries in replies or []:
                for entry_id, fields in entries:
                    event = TaskEvent(
                        int(entry_id.split(b"-")[1]),
                        cast(Kind, fields[b"kind"].decode()),
                        json.loads(fields[b"data"]),
                    )
                    seen = event.id
                    yield event
                    if event.ends:
                        return

    async def aclose(self) -> None:
        self._closing = True
        self._news.set()
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._writer, timeout=5)
        await self._write()  # what was published last
        await self._redis.aclose()


def _key(task_id: str) -> str:
    return f"ra:events:{task_id}"
