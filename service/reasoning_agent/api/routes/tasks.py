"""The task routes: submit, read, cancel and list; each turns the task service's answer into HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from reasoning_agent.api.deps import ApiKeyDep, QueryLimitDep, ServicesDep, TaskServiceDep
from reasoning_agent.api.streams import event_stream, last_event_id
from reasoning_agent.errors import error_responses
from reasoning_agent.observability.telemetry import current_trace_id
from reasoning_agent.tasks.schemas import Moment, TaskIn, TaskList, TaskOut
from reasoning_agent.tasks.service import Verdict
from reasoning_agent.tasks.status import TaskStatus

__all__ = ["router"]

# Every authenticated route can answer these; each route adds its own.
router = APIRouter(responses=error_responses(400, 401, 414, 422, 503))

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$"),
]


@router.post(
    "/task",
    response_model=TaskOut,
    summary="Answer a prompt and store the task",
    responses={
        200: {
            "model": TaskOut,
            "content": {"text/event-stream": {}},
            "description": "The task; with `stream: true` (or `Accept: text/event-stream`), "
            "its events as they happen",
        },
        202: {"model": TaskOut, "description": "Queued (`mode: async` or `Prefer: respond-async`)"},
        **error_responses(403, 409, 413, 429, 502, 504),
    },
)
async def submit_task(
    request: Request,
    response: Response,
    body: TaskIn,
    caller: ApiKeyDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> TaskOut | Response:
    tasks, settings = services.tasks, services.settings
    prefer_async = "respond-async" in request.headers.get("prefer", "")
    background = body.mode == "async" or prefer_async
    wants_events = "text/event-stream" in request.headers.get("accept", "")
    if not background and (body.stream or wants_events):
        streamed, events = await tasks.stream(
            body,
            owner=caller.name,
            idempotency_key=idempotency_key,
            trace_id=current_trace_id(request.headers),
        )

        def on_disconnect() -> str:
            if settings.stream_on_disconnect == "cancel" and tasks.stop_stream(streamed.task.id):
                return "cancelled"
            return "continued"

        answer = event_stream(
            events, heartbeat_s=settings.stream_heartbeat_s, on_disconnect=on_disconnect
        )
        answer.headers.update(streamed.headers)
        return answer
    submitted = await tasks.submit(
        body,
        owner=caller.name,
        background=background,
        idempotency_key=idempotency_key,
        trace_id=current_trace_id(request.headers),
    )
    if submitted.verdict == Verdict.ACCEPTED:
        headers = {"Location": f"/task/{submitted.task.id}", **submitted.headers}
        if prefer_async:
            headers["Preference-Applied"] = "respond-async"
        return JSONResponse(TaskOut.of(submitted.task).model_dump(mode="json"), 202, headers)
    response.headers.update(submitted.headers)
    return TaskOut.of(submitted.task)


@router.get(
    "/task/{task_id}",
    response_model=TaskOut,
    summary="One of the caller's tasks",
    responses=error_responses(404, 429),
)
async def read_task(
    task_id: str, caller: ApiKeyDep, _: QueryLimitDep, tasks: TaskServiceDep
) -> TaskOut:
    return TaskOut.of(await tasks.get(caller.name, task_id))


@router.get(
    "/task/{task_id}/events",
    summary="Follow one of the caller's tasks as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The task's events"},
        **error_responses(404, 429),
    },
)
async def follow_task(
    task_id: str,
    caller: ApiKeyDep,
    _: QueryLimitDep,
    services: ServicesDep,
    last_event: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> EventSourceResponse:
    events = await services.tasks.events_of(caller.name, task_id, after=last_event_id(last_event))
    return event_stream(events, heartbeat_s=services.settings.stream_heartbeat_s)


@router.delete(
    "/task/{task_id}",
    response_model=TaskOut,
    summary="Cancel a queued or running background task",
    responses=error_responses(404, 409, 429),
)
async def cancel_task(
    task_id: str, caller: ApiKeyDep, _: QueryLimitDep, tasks: TaskServiceDep
) -> TaskOut:
    return TaskOut.of(await tasks.cancel(caller.name, task_id))


@router.get(
    "/query",
    response_model=TaskList,
    summary="The caller's tasks, newest first",
    responses=error_responses(429),
)
async def query_tasks(
    caller: ApiKeyDep,
    _: QueryLimitDep,
    tasks: TaskServiceDep,
    q: Annotated[str | None, Query(max_length=500, description="text in prompt or answer")] = None,
    status: TaskStatus | None = None,
    since: Moment | None = None,
    until: Moment | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TaskList:
    page = await tasks.query(
        caller.name, text=q, status=status, since=since, until=until, limit=limit, cursor=cursor
    )
    return TaskList(items=[TaskOut.of(t) for t in page.items], next_cursor=page.next_cursor)
