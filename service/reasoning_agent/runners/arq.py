"""Background tasks handed to `reasoning-agent worker` processes through arq's Redis queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

__all__ = ["CODEC", "QUEUE", "ArqRunner", "deserialize", "serialize"]

QUEUE = "reasoning-agent:tasks"


def serialize(data: dict[str, Any]) -> bytes:
    """Jobs and results as JSON, never pickles: whoever can write to Redis must not be able to
    run code in the workers or the HTTP pods. A failed job's exception is kept as its repr."""
    return json.dumps(data, default=repr).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a job is a JSON object")
    return data


CODEC: dict[str, Any] = {"job_serializer": serialize, "job_deserializer": deserialize}


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
            self._pool = await create_pool(settings, default_queue_name=QUEUE, **CODEC)
        return self._pool

    async def submit(self, task_id: str) -> None:
        pool = await self._connected()
        await pool.enqueue_job("run_task", task_id, _job_id=task_id, _queue_name=QUEUE)

    async def cancel(self, task_id: str) -> None:
        from arq.jobs import Job

        job = Job(task_id, await self._connected(), _queue_name=QUEUE, _deserializer=deserialize)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await job.abort(timeout=0.1, poll_delay=0.05)

    async def alive(self, task_ids: list[str]) -> set[str]:
        """A job lives while its key does: arq deletes it when the job ends, and a Redis
        without persistence (or evicting keys) may lose it before."""
        from arq.constants import in_progress_key_prefix, job_key_prefix

        pool = await self._connected()
        async with pool.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.exists(job_key_prefix + task_id, in_progress_key_prefix + task_id)
            found = await pipe.execute()
        return {task_id for task_id, count in zip(task_ids, found, strict=True) if count}

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
