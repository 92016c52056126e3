"""`reasoning-agent worker`: arq workers that take background tasks off Redis until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.observability import logs, telemetry
from reasoning_agent.runners import maintenance
from reasoning_agent.runners.arq import CODEC, QUEUE
from reasoning_agent.services import Services, build_services
from reasoning_agent.tasks.leases import MAX_TRIES

__all__ = ["HEARTBEAT_S", "check", "run", "worker_settings"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # how often a live worker that reaches Redis touches its heartbeat file


def check(settings: Settings, *, max_age_s: float) -> bool:
    """For a liveness probe: this pod's worker touched its heartbeat file lately."""
    try:
        age = time.time() - settings.worker_heartbeat_file.stat().st_mtime
    except OSError:
        return False
    return age <= max_age_s


async def _heartbeat(path: Path, redis: Any) -> None:
    """Touch `path` every HEARTBEAT_S while the loop turns and Redis answers a ping."""
    while True:
        try:
            await asyncio.wait_for(redis.ping(), HEARTBEAT_S)
            await asyncio.to_thread(path.touch)
        except Exception as exc:
            log.warning("worker heartbeat: Redis did not answer: %s", exc.__class__.__name__)
        await asyncio.sleep(HEARTBEAT_S)


def run(settings: Settings) -> None:
    """Work until SIGTERM."""
    from arq.worker import Worker

    if settings.redis_url is None:
        raise ConfigError(
            "REDIS_URL: the worker takes tasks from Redis; without it, serve runs them"
        )
    logs.configure_logging(settings.log_level, secrets=settings.secret_values())
    telemetry.check_tracing_config()
    Worker(**worker_settings(settings)).run()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq Worker options: the jobs, the sweep, and the services they share."""
    from arq import cron, func
    from arq.connections import RedisSettings

    assert settings.redis_url is not None
    deadline = settings.llm_timeout_s

    async def startup(ctx: dict[str, Any]) -> None:
        stack = AsyncExitStack()
        ctx["stack"] = stack
        ctx["services"] = services = await stack.enter_async_context(build_services(settings))
        beating = asyncio.create_task(_heartbeat(settings.worker_heartbeat_file, ctx["redis"]))
        stack.callback(beating.cancel)
        stack.callback(settings.worker_heartbeat_file.unlink, missing_ok=True)
        log.info("worker started", extra={"provider": services.agent.provider.name, "queue": QUEUE})

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["stack"].aclose()

    async def run_task(ctx: dict[str, Any], task_id: str) -> None:
        if not isinstance(task_id, str):  # a job from Redis is input like any other
            raise TypeError("run_task takes a task id")
        services: Services = ctx["services"]
        await services.tasks.run(task_id)

    async def sweep(ctx: dict[str, Any]) -> None:
        """Free what dead workers held and re-enqueue lost jobs: nothing stays unfinished."""
        services: Services = ctx["services"]
        await maintenance.sweep(services.tasks)

    return {
        "functions": [func(run_task, name="run_task", max_tries=MAX_TRIES)],
        "cron_jobs": [cron(sweep, second={0, 30}, run_at_startup=True)],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url.get_secret_value()),
        "queue_name": QUEUE,
        "job_timeout": deadline + 5,  # the agent keeps the deadline; this only catches a hang
        "max_jobs": settings.worker_concurrency,
        "allow_abort_jobs": True,
        "keep_result": 0,
        "poll_delay": 0.1,
        **CODEC,
    }
