"""Background tasks: `queued → running → completed|failed|cancelled`, through arq on Redis, or
in this process when there is no Redis (queued tasks live in the database and resume on start)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from reasoning_agent import llm, metrics, tasks
from reasoning_agent.agent import ReasoningAgent
from reasoning_agent.config import Settings
from reasoning_agent.db import Database
from reasoning_agent.errors import for_llm_error
from reasoning_agent.models import Task, TaskStatus

__all__ = [
    "ArqRunner",
    "InProcessRunner",
    "Outcome",
    "Runner",
    "answer",
    "ask",
    "execute",
    "horizons",
    "record",
    "sweep_forever",
    "worker_settings",
]

log = logging.getLogger(__name__)

QUEUE = "reasoning-agent:tasks"
MAX_TRIES = 3  # runs of one background task, when the workers running it die


class Runner(Protocol):
    """Where a queued task goes to be run."""

    async def submit(self, task_id: str) -> None: ...

    async def cancel(self, task_id: str) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call to the agent gave: an answer or an error, and how long it took."""

    result: llm.LLMResult | None
    error: llm.LLMError | None
    seconds: float


async def answer(
    database: Database,
    task: Task,
    agent: ReasoningAgent,
    *,
    prompt: str,
    system: str | None,
    store_text: bool,
    expect: str | None = None,
) -> Outcome:
    """Ask the agent about a stored task, then record the answer or the failure on it: the
    background path. POST /task calls `ask` and `record` itself, to start the call before the
    task is stored."""
    outcome = await ask(
        agent,
        prompt=prompt,
        system=system,
        model=task.model,
        temperature=task.temperature,
        max_tokens=task.max_tokens,
    )
    await record(
        database, task, outcome, provider=agent.provider.name, store_text=store_text, expect=expect
    )
    return outcome


async def ask(
    agent: ReasoningAgent,
    *,
    prompt: str,
    system: str | None,
    model: str,
    temperature: float | None,
    max_tokens: int | None,
) -> Outcome:
    """The agent's answer or the LLMError that says why there is none, and how long it took."""
    started = time.monotonic()
    try:
        result = await agent.run(
            prompt, system=system, model=model, temperature=temperature, max_tokens=max_tokens
        )
    except llm.LLMError as exc:
        return Outcome(None, exc, time.monotonic() - started)
    return Outcome(result, None, time.monotonic() - started)


async def record(
    database: Database,
    task: Task,
    outcome: Outcome,
    *,
    provider: str,
    store_text: bool,
    expect: str | None = None,
) -> None:
    """Store the outcome on the task and count it. With `expect`, a task no longer in that
    status (cancelled meanwhile) is left as it is."""
    model, seconds = metrics.model_label(task.model), outcome.seconds
    latency_ms = round(seconds * 1000, 2)
    metrics.LLM_SECONDS.labels(provider, model).observe(seconds)
    if outcome.error is not None:
        error_type = for_llm_error(outcome.error).type
        metrics.LLM_CALLS.labels(provider, model, error_type).inc()
        failed = await tasks.mark_failed(
            database,
            task,
            error_type=error_type,
            message=str(outcome.error),
            attempts=outcome.error.attempts,
            latency_ms=latency_ms,
            expect=expect,
        )
        if failed:
            metrics.TASKS.labels(TaskStatus.FAILED).inc()
        return
    result = outcome.result
    assert result is not None
    metrics.LLM_CALLS.labels(provider, model, "ok").inc()
    metrics.TOKENS.labels(task.owner, "input").inc(result.prompt_tokens or 0)
    metrics.TOKENS.labels(task.owner, "output").inc(result.completion_tokens or 0)
    done = await tasks.mark_completed(
        database, task, result, latency_ms=latency_ms, store_text=store_text, expect=expect
    )
    if done:
        metrics.TASKS.labels(TaskStatus.COMPLETED).inc()


async def execute(
    task_id: str,
    *,
    database: Database,
    agent: ReasoningAgent,
    store_text: bool,
    statuses: tuple[str, ...] = (TaskStatus.QUEUED,),
) -> None:
    """Claim one task and answer it; a task cancelled meanwhile keeps its `cancelled`."""
    async with database.sessions() as session:
        task = await tasks.claim(session, task_id, statuses=statuses)
    if task is None:
        return  # cancelled, finished, or another process has it
    assert task.prompt is not None, "background tasks need STORE_PROMPTS=true"
    await answer(
        database,
        task,
        agent,
        prompt=task.prompt,
        system=task.system,
        store_text=store_text,
        expect=TaskStatus.RUNNING,
    )


class InProcessRunner:
    """Runs tasks as asyncio tasks of this worker, at most `concurrency` at once."""

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

    async def resume(self, sessions: async_sessionmaker[AsyncSession]) -> int:
        """Pick up what a stopped process left queued. (A `running` one may belong to a live
        sibling worker; the sweep fails it once it is past the deadline.)"""
        async with sessions() as session:
            ids = await tasks.unfinished_ids(session, statuses=(TaskStatus.QUEUED,))
        for task_id in ids:
            await self.submit(task_id)
        return len(ids)

    async def cancel(self, task_id: str) -> None:
        job = self._running.get(task_id)
        if job is not None:
            job.cancel()

    async def aclose(self) -> None:
        for job in list(self._running.values()):
            job.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)


class ArqRunner:
    """Hands tasks to `reasoning-agent worker` processes through arq's Redis queue."""

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


def horizons(deadline_s: float, *, arq: bool) -> dict[str, timedelta]:
    """How long a `pending` and a `running` task may live before its process must be dead.
    A request or an in-process job ends by the deadline; an arq job may be handed out again
    (its claim lasts job_timeout + 10 s) up to max_tries times."""
    request = timedelta(seconds=deadline_s + 5)
    retries = timedelta(seconds=MAX_TRIES * (deadline_s + 5 + 10) + 15)
    return {"pending_after": request, "running_after": retries if arq else request}


async def sweep_forever(
    sessions: async_sessionmaker[AsyncSession], *, deadline_s: float, arq: bool
) -> None:
    """Fail tasks left `pending` or `running` by a process that died."""
    while True:
        await asyncio.sleep(min(60.0, deadline_s))
        try:
            async with sessions() as session:
                failed = await tasks.fail_interrupted(session, **horizons(deadline_s, arq=arq))
            if failed:
                log.warning("marked interrupted tasks as failed", extra={"failed": failed})
        except Exception as exc:
            log.error("sweep failed: %s", exc.__class__.__name__)


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq Worker options for `reasoning-agent worker`."""
    from arq import cron, func
    from arq.connections import RedisSettings

    from reasoning_agent.llm import load_provider

    assert settings.redis_url is not None
    deadline = settings.llm_timeout_s

    async def startup(ctx: dict[str, Any]) -> None:
        provider = load_provider(settings)
        ctx.update(
            database=Database(settings.database_url.get_secret_value()),
            provider=provider,
            agent=ReasoningAgent(provider, timeout_s=deadline),
        )
        log.info("worker started", extra={"provider": provider.name, "queue": QUEUE})

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["provider"].aclose()
        await ctx["database"].aclose()

    async def run_task(ctx: dict[str, Any], task_id: str) -> None:
        # `running` too: arq runs a job again only after the worker that had it is gone.
        await execute(
            task_id,
            database=ctx["database"],
            agent=ctx["agent"],
            store_text=settings.store_prompts,
            statuses=(TaskStatus.QUEUED, TaskStatus.RUNNING),
        )

    async def sweep(ctx: dict[str, Any]) -> None:
        """Fail what outlived every retry: nothing stays `running` forever."""
        async with ctx["database"].sessions() as session:
            failed = await tasks.fail_interrupted(session, **horizons(deadline, arq=True))
        if failed:
            log.warning("marked interrupted tasks as failed", extra={"failed": failed})

    return {
        "functions": [func(run_task, name="run_task", max_tries=MAX_TRIES)],
        "cron_jobs": [cron(sweep, second={0}, run_at_startup=True)],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url.get_secret_value()),
        "queue_name": QUEUE,
        "job_timeout": deadline + 5,  # the agent keeps the deadline; this only catches a hang
        "max_jobs": settings.worker_concurrency,
        "allow_abort_jobs": True,
        "keep_result": 0,
        "poll_delay": 0.1,
    }
