"""Background tasks as asyncio tasks of this worker, for a service without Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["InProcessRunner"]

log = logging.getLogger(__name__)


class InProcessRunner:
    """Runs tasks as asyncio tasks of this worker, at most `concurrency` at once; queued ones
    live in the database, so a restarted process resumes them."""

    def __init__(self, run: Callable[[str], Awaitable[None]], *, concurrency: int = 8) -> None:
        self._run = run
        self._slots = asyncio.Semaphore(concurrency)
        self._running: dict[str, asyncio.Task[None]] = {}

    async def submit(self, task_id: str) -> None:
        job = asyncio.create_task(self._guarded(task_id), name=f"task-{task_id}")
        self._running[task_id] = job
        job.add_done_callback(lambda _: self._running.pop(task_id, None))

    async def _guarded(self, task_id: str) -> None:
        async with self._slots:
            try:
                await self._run(task_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s failed unexpectedly", task_id)

    async def cancel(self, task_id: str) -> None:
        job = self._running.get(task_id)
        if job is not None:
            job.cancel()

    async def aclose(self) -> None:
        for job in list(self._running.values()):
            job.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
