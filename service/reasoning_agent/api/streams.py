"""Task events as Server-Sent Events: one `id`, `event` and JSON `data` each, a comment line
while nothing else is sent, and a count of the clients that leave before the end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent

from reasoning_agent.observability import metrics
from reasoning_agent.tasks.events import TaskEvent

__all__ = ["event_stream", "last_event_id"]

HEADERS = {"Cache-Control": "no-cache"}  # sse-starlette adds X-Accel-Buffering: no


def event_stream(
    events: AsyncIterator[TaskEvent],
    *,
    heartbeat_s: float,
    on_disconnect: Callable[[], str] | None = None,
) -> EventSourceResponse:
    """The response that sends `events`; a client gone before the last one is counted by
    what `on_disconnect` did to the task (`continued` without it)."""
    # ping=0: sse-starlette's own pings come on a fixed beat, ours only when idle.
    return EventSourceResponse(_sent(events, heartbeat_s, on_disconnect), ping=0, headers=HEADERS)


async def _sent(
    events: AsyncIterator[TaskEvent],
    heartbeat_s: float,
    on_disconnect: Callable[[], str] | None,
) -> AsyncIterator[ServerSentEvent]:
    metrics.STREAMS_OPEN.inc()
    ended = False
    # The events are read by a task of their own, so that waiting for the next one can time
    # out (for a heartbeat) without cancelling the iterator.
    queue: asyncio.Queue[TaskEvent | None] = asyncio.Queue()
    pump = asyncio.create_task(_pump(events, queue))
    try:
        while True:
            try:
                async with asyncio.timeout(heartbeat_s):
                    event = await queue.get()
            except TimeoutError:
                yield ServerSentEvent(comment="keep-alive")
                continue
            if event is None:
                break
            yield ServerSentEvent(
                data=json.dumps(event.data, separators=(",", ":")),
                event=event.kind,
                id=str(event.id),
            )
            ended = event.ends
    finally:
        # No await here: the response's cancel scope cancels every one.
        pump.cancel()
        metrics.STREAMS_OPEN.dec()
        if not ended:
            became = on_disconnect() if on_disconnect else "continued"
            metrics.STREAM_DISCONNECTS.labels(became).inc()


async def _pump(events: AsyncIterator[TaskEvent], queue: asyncio.Queue[TaskEvent | None]) -> None:
    try:
        async for event in events:
            queue.put_nowait(event)
    finally:
        queue.put_nowait(None)


def last_event_id(value: str | None) -> int:
    """The event to resume after, from a Last-Event-ID header; 0 (from the start) when absent
    or not one of ours."""
    return int(value) if value and value.isdigit() and len(value) < 10 else 0
