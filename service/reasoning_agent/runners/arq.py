"""Background tasks handed to `reasoning-agent worker` processes through arq's Redis queue."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["MAX_TRIES", "QUEUE", "ArqRunner"]

QUEUE = "reasoning-agent:tasks"
MAX_TRIES = 3  # runs of one background task, when the workers running it die


class ArqRunner:
    """Enqueues a job per task id; the job runs in whichever worker takes it."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._pool: Any = None

    async def _connected(self) -> Any:
        """The pool, made on first use, so the service starts even while Redis is away."""
        if self._pool is None:
            from arq import create_pool
            from arq.connections import RedisSettings

            settings = RedisSettings.from_dsn(self._url)
            settings.conn_retries = 0
            self._pool = await create_pool(settings, default_queue_name=QUEUE)
        return self._pool

    async def submit(self, task_id: str) -> None:
        pool = await self._connected()
        await pool.enqueue_job("run_task", task_id, _job_id=task_id, _queue_name=QUEUE)

    async def cancel(self, task_id: str) -> None:
        from arq.jobs import Job

        job = Job(task_id, await self._connected(), _queue_name=QUEUE)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await job.abort(timeout=0.1, poll_delay=0.05)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
