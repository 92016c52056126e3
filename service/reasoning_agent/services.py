"""The object graph of one process: built once from the settings, for the app and the worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.keys import KeyRing
from reasoning_agent.llm.agent import ReasoningAgent
from reasoning_agent.llm.registry import load_provider, provider_names
from reasoning_agent.observability import telemetry
from reasoning_agent.policies import Policies
from reasoning_agent.quota import Quota
from reasoning_agent.ratelimit import RateLimiter
from reasoning_agent.runners.arq import ArqRunner
from reasoning_agent.runners.base import Runner
from reasoning_agent.runners.inprocess import InProcessRunner
from reasoning_agent.storage.db import Database
from reasoning_agent.tasks.events import EventLog, SharedEventLog
from reasoning_agent.tasks.repository import TaskRepository
from reasoning_agent.tasks.service import TaskService

__all__ = ["Services", "build_services", "check_settings"]


@dataclass(frozen=True, slots=True)
class Services:
    """What a process builds once and every request or job shares."""

    settings: Settings
    database: Database
    limiter: RateLimiter
    quota: Quota
    agent: ReasoningAgent
    runner: Runner
    tasks: TaskService


def check_settings(settings: Settings) -> None:
    """Fail at start on what the environment alone cannot tell: key files, provider names,
    the tracing exporter, clashing ports, the key policies file."""
    keyring = KeyRing.from_settings(settings)
    Policies(settings)
    unknown = settings.admin_names - set(keyring.names)
    if unknown:
        raise ConfigError(f"ADMIN_KEYS: no API key is named {', '.join(sorted(unknown))}")
    telemetry.check_tracing_config()
    if settings.metrics_port is not None and settings.metrics_port == settings.port:
        raise ConfigError("METRICS_PORT: must differ from PORT")
    if settings.llm_provider not in provider_names():
        raise ConfigError(
            f"LLM_PROVIDER: unknown provider {settings.llm_provider!r}; "
            f"installed: {', '.join(provider_names())}"
        )


@asynccontextmanager
async def build_services(settings: Settings) -> AsyncIterator[Services]:
    """Database, limiter, provider, agent, runner and task service; closed in reverse on exit.
    Nothing here connects yet: a Redis or database that is away fails requests, not startup."""
    database = Database(
        settings.database_url.get_secret_value(), pool_size=settings.database_pool_size
    )
    telemetry.instrument_engines(database.engines)
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    limiter = RateLimiter(
        redis_url=redis_url,
        on_store_error=settings.rate_limit_on_store_error,
        local_share=settings.workers,
    )
    quota = Quota(
        limiter=limiter,
        policies=Policies(settings),
        default_max_tokens=settings.default_max_tokens,
    )
    provider = load_provider(settings)
    agent = ReasoningAgent(
        provider, timeout_s=settings.llm_timeout_s, reasoning_models=settings.reasoning_models
    )
    runner: Runner
    if settings.uses_arq and redis_url is not None:
        runner = ArqRunner(redis_url)
    else:
        # The in-process runner runs each task through the service it feeds.
        runner = InProcessRunner(
            lambda task_id: tasks.run(task_id), concurrency=settings.worker_concurrency
        )
    # With Redis, any process can follow a task that another one runs.
    events = (
        SharedEventLog(redis_url, ttl_s=settings.stream_events_ttl_s)
        if redis_url is not None
        else EventLog(ttl_s=settings.stream_events_ttl_s)
    )
    tasks = TaskService(
        repository=TaskRepository(database),
        events=events,
        agent=agent,
        runner=runner,
        quota=quota,
        store_text=settings.store_prompts,
        max_prompt_chars=settings.max_prompt_chars,
    )
    # Every lease this process holds, renewed until the end, the drain included.
    renewing = asyncio.create_task(tasks.leases.renew_forever(), name="renew-leases")
    try:
        yield Services(
            settings=settings,
            database=database,
            limiter=limiter,
            quota=quota,
            agent=agent,
            runner=runner,
            tasks=tasks,
        )
    finally:
        await tasks.drain(timeout_s=settings.llm_timeout_s)  # streamed answers still coming
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        await runner.aclose()
        await events.aclose()
        await provider.aclose()
        await limiter.aclose()
        await database.aclose()
