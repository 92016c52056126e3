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
        self._started: set[str] = set()  # past the slot: claimed, or about to be
        self._draining = False

    async def submit(self, task_id: str) -> None:
        if self._draining:  # stays queued in the database for the next process
            return
        job = asyncio.create_task(self._guarded(task_id), name=f"task-{task_id}")
        self._running[task_id] = job
        job.add_done_callback(lambda _: self._running.pop(task_id, None))

    async def drain(self, grace_s: float) -> list[str]:
        """Take no more; let started tasks run up to `grace_s`, then stop them. The ids of
        those stopped mid-run, for the caller to put back in the queue."""
        self._draining = True
        for task_id, job in list(self._running.items()):
            if task_id not in self._started:
                job.cancel()  # never claimed: still queued
        started = [job for task_id, job in self._running.items() if task_id in self._started]
        if started:
            await asyncio.wait(started, timeout=grace_s)
        stopped = [task_id for task_id in self._started if task_id in self._running]
        await self.aclose()
        return stopped

    async def _guarded(self, task_id: str) -> None:
        async with self._slots:
            self._started.add(task_id)
            try:
                await self._run(task_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s failed unexpectedly", task_id)
            finally:
                self._started.discard(task_id)

    async def cancel(self, task_id: str) -> None:
        job = self._running.get(task_id)
        if job is not None:
            job.cancel()

    async def alive(self, task_ids: list[str]) -> set[str]:
        return {task_id for task_id in task_ids if task_id in self._running}

    async def aclose(self) -> None:
        for job in list(self._running.values()):
            job.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
