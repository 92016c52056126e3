"""The endpoints: submit and read tasks, list them, and report health and metrics."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from reasoning_agent import jobs, metrics, tasks
from reasoning_agent.agent import ReasoningAgent
from reasoning_agent.api.deps import (
    ApiKeyDep,
    QueryLimitDep,
    RunnerDep,
    ServicesDep,
    SessionDep,
    TaskLimitDep,
)
from reasoning_agent.db import ping
from reasoning_agent.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    for_llm_error,
    for_type,
)
from reasoning_agent.models import Task, TaskStatus
from reasoning_agent.schemas import HealthOut, TaskIn, TaskList, TaskOut, error_responses
from reasoning_agent.telemetry import current_trace_id

__all__ = ["probes", "router"]

# Every authenticated route can answer these; each route adds its own.
router = APIRouter(responses=error_responses(400, 401, 414, 422, 503))
probes = APIRouter()  # for the kubelet: no key, no data

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$"),
]


@router.post(
    "/task",
    response_model=TaskOut,
    summary="Answer a prompt and store the task",
    responses={
        202: {"model": TaskOut, "description": "Queued (`mode: async` or `Prefer: respond-async`)"},
        **error_responses(409, 413, 429, 502, 504),
    },
)
async def submit_task(
    request: Request,
    body: TaskIn,
    caller: ApiKeyDep,
    _: TaskLimitDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> TaskOut | JSONResponse:
    # One dependency, not four: each costs ~35 us of CPU on the busiest route.
    settings, agent, database = services.settings, services.agent, services.database
    if len(body.prompt) > settings.max_prompt_chars:
        raise PayloadTooLarge(f"prompt is longer than {settings.max_prompt_chars} characters")
    if body.system and len(body.system) > settings.max_prompt_chars:
        raise PayloadTooLarge(f"system is longer than {settings.max_prompt_chars} characters")
    reason = agent.unconfigured_reason()
    if reason:
        raise ServiceUnavailable(f"the LLM provider is not configured: {reason}")
    prefer_async = "respond-async" in request.headers.get("prefer", "")
    background = body.mode == "async" or prefer_async
    if background and not settings.store_prompts:
        raise InvalidRequest(
            "background tasks need STORE_PROMPTS=true: the queued prompt is stored"
        )
    model = body.model or agent.default_model
    started = time.monotonic()
    asking = None
    if not background and idempotency_key is None:
        # Nothing to look up first, so the request goes to the LLM now and the pending row is
        # written while the LLM works on it: the write adds nothing to the caller's wait.
        asking = _ask(agent, body, model)
        await asyncio.sleep(0)  # lets it put the request on the wire
    digest = tasks.request_hash(body, model)  # for the row, so after the request is sent
    try:
        task, created = await tasks.create_pending(
            database,
            owner=caller.name,
            body=body,
            model=model,
            digest=digest,
            idempotency_key=idempotency_key,
            trace_id=current_trace_id(request.headers),
            store_text=settings.store_prompts,
            status=TaskStatus.QUEUED if background else TaskStatus.PENDING,
        )
    except BaseException:
        if asking is not None:  # not stored: stop the call, the caller gets the error alone
            asking.cancel()
        raise
    if background:
        if created:
            try:
                await services.runner.submit(task.id)
            except Exception as exc:
                await tasks.mark_failed(
                    database,
                    task,
                    error_type="unavailable",
                    message="the task queue is unavailable",
                    attempts=0,
                    latency_ms=0,
                    expect=TaskStatus.QUEUED,
                )
                raise ServiceUnavailable("the task queue is unavailable") from exc
        else:
            _same_request(task, digest)
        headers = {"Location": f"/task/{task.id}"}
        if prefer_async:
            headers["Preference-Applied"] = "respond-async"
        return JSONResponse(TaskOut.of(task).model_dump(mode="json"), 202, headers=headers)
    if not created:
        return _replay(task, digest)

    try:
        outcome = await (asking or _ask(agent, body, model))
        await jobs.record(
            database, task, outcome, provider=agent.provider.name, store_text=settings.store_prompts
        )
    except asyncio.CancelledError:
        await asyncio.shield(
            tasks.mark_failed(
                database,
                task,
                error_type="interrupted",
                message="the request was cancelled before the answer came",
                attempts=0,
                latency_ms=_ms_since(started),
            )
        )
        raise
    request.state.llm_seconds = outcome.seconds  # for the middleware's overhead histogram
    if outcome.result is None:
        assert outcome.error is not None
        error = for_llm_error(outcome.error)
        raise error(str(outcome.error), extra={"task_id": task.id}) from None
    answer = TaskOut.of(task)
    if not settings.store_prompts:  # the caller still gets its text; the database never did
        answer = answer.model_copy(
            update={"prompt": body.prompt, "system": body.system, "answer": outcome.result.answer}
        )
    return answer


def _ask(agent: ReasoningAgent, body: TaskIn, model: str) -> asyncio.Task[jobs.Outcome]:
    return asyncio.create_task(
        jobs.ask(
            agent,
            prompt=body.prompt,
            system=body.system,
            model=model,
            temperature=body.temperature,
            max_tokens=body.max_tokens,
        )
    )


def _replay(task: Task, digest: str) -> TaskOut:
    """Answer a repeated Idempotency-Key as the first request was answered."""
    _same_request(task, digest)
    if task.status == TaskStatus.PENDING:
        raise Conflict("a request with this Idempotency-Key is still in progress")
    if task.status == TaskStatus.FAILED:
        error = for_type(task.error_type)
        raise error(task.error or "the task failed", extra={"task_id": task.id})
    return TaskOut.of(task)


def _same_request(task: Task, digest: str) -> None:
    if task.request_hash != digest:
        raise InvalidRequest("Idempotency-Key was already used with a different request")


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)


@router.get(
    "/task/{task_id}",
    response_model=TaskOut,
    summary="One of the caller's tasks",
    responses=error_responses(404, 429),
)
async def read_task(
    task_id: str, caller: ApiKeyDep, _: QueryLimitDep, session: SessionDep
) -> TaskOut:
    task = await tasks.get_task(session, caller.name, task_id)
    if task is None:
        raise NotFound("no such task")
    return TaskOut.of(task)


@router.delete(
    "/task/{task_id}",
    response_model=TaskOut,
    summary="Cancel a queued or running background task",
    responses=error_responses(404, 409, 429),
)
async def cancel_task(
    task_id: str, caller: ApiKeyDep, _: QueryLimitDep, runner: RunnerDep, session: SessionDep
) -> TaskOut:
    if not await tasks.cancel(session, caller.name, task_id):
        task = await tasks.get_task(session, caller.name, task_id)
        if task is None:
            raise NotFound("no such task")
        raise Conflict(f"the task is {task.status}: only queued or running tasks can be cancelled")
    await runner.cancel(task_id)
    task = await tasks.get_task(session, caller.name, task_id)  # loaded fresh: cancelled
    assert task is not None
    return TaskOut.of(task)


@router.get(
    "/query",
    response_model=TaskList,
    summary="The caller's tasks, newest first",
    responses=error_responses(429),
)
async def query_tasks(
    caller: ApiKeyDep,
    _: QueryLimitDep,
    session: SessionDep,
    q: Annotated[str | None, Query(max_length=500, description="text in prompt or answer")] = None,
    status: Literal["pending", "queued", "running", "completed", "failed", "cancelled"]
    | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TaskList:
    if q is not None and "\x00" in q:
        raise InvalidRequest("q: must not contain NUL characters")
    try:
        page = await tasks.query_tasks(
            session,
            caller.name,
            text=q,
            status=status,
            since=_aware(since),
            until=_aware(until),
            limit=limit,
            cursor=cursor,
        )
    except tasks.InvalidCursor as exc:
        raise InvalidRequest(f"cursor: {exc}") from None
    return TaskList(items=[TaskOut.of(t) for t in page.items], next_cursor=page.next_cursor)


def _aware(moment: datetime | None) -> datetime | None:
    """Times without an offset are taken as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@router.get("/healthz", response_model=HealthOut, summary="Database, Redis and LLM checks")
async def healthz(_: ApiKeyDep, services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await ping(services.database.engine)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"fail: {exc.__class__.__name__}"
    redis_ok = await services.limiter.check_store()
    checks["redis"] = {None: "disabled", True: "ok", False: "fail"}[redis_ok]
    reason = services.agent.unconfigured_reason()
    checks["llm"] = (
        f"not configured: {reason}" if reason else f"ok ({services.agent.provider.name})"
    )
    if checks["database"] != "ok":
        status = "fail"
    elif redis_ok is False or reason:
        status = "degraded"
    else:
        status = "ok"
    return JSONResponse(
        {"status": status, "checks": checks}, status_code=503 if status == "fail" else 200
    )


@probes.get("/livez", summary="The process is alive (no key needed)")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", summary="The database answers (no key needed)")
async def readyz(services: ServicesDep) -> JSONResponse:
    try:
        async with asyncio.timeout(2):
            await ping(services.database.engine)
    except Exception:
        return JSONResponse({"status": "fail"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", summary="Prometheus metrics of every worker", response_class=Response)
async def prometheus_metrics(_: ApiKeyDep) -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
