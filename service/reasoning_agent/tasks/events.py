"""A task's events (`task`, `delta`, `done`, `error`), kept a while so a client can follow a
task and pick up where its connection dropped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["END_KINDS", "EventLog", "TaskEvent"]

Kind = Literal["task", "delta", "done", "error"]
END_KINDS = frozenset({"done", "error"})
MAX_EVENTS = 100_000  # per task: a runaway upstream cannot fill the memory


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
    """The events of the tasks this process runs, in memory."""

    def __init__(self, *, ttl_s: float = 600.0) -> None:
        self._logs: dict[str, _Log] = {}
        self._ttl_s = ttl_s

    def has(self, task_id: str) -> bool:
        return task_id in self._logs

    def publish(self, task_id: str, kind: Kind, data: dict[str, Any]) -> TaskEvent:
        """Add the next event of `task_id` and wake its followers."""
        log = self._logs.get(task_id)
        if log is None:
            self._expire()
            log = self._logs[task_id] = _Log()
        event = TaskEvent(len(log.events) + 1, kind, data)
        if len(log.events) < MAX_EVENTS or event.ends:
            log.events.append(event)
        if event.ends:
            log.expires = time.monotonic() + self._ttl_s
        log.changed.set()
        log.changed = asyncio.Event()
        return event

    async def follow(self, task_id: str, *, after: int = 0) -> AsyncIterator[TaskEvent]:
        """The events after `after`, then each new one, until the task's last; nothing for a
        task this process does not know."""
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
        for task_id in [t for t, log in self._logs.items() if log.expires and log.expires < now]:
            del self._logs[task_id]
