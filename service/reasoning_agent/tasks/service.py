"""The life of a task: checked, stored, answered by the agent (now or in the background),
recorded and counted. Routes and background runners both come through here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from reasoning_agent.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    StoreFailed,
    for_error_type,
    for_llm_error,
)
from reasoning_agent.llm.agent import ReasoningAgent
from reasoning_agent.llm.base import Delta, LLMError, LLMResult, OnDelta
from reasoning_agent.observability import metrics
from reasoning_agent.quota import Admitted, Quota
from reasoning_agent.runners.base import Runner
from reasoning_agent.tasks.events import EventLog, Kind, TaskEvent
from reasoning_agent.tasks.leases import MAX_TRIES, Leases
from reasoning_agent.tasks.models import Task
from reasoning_agent.tasks.repository import (
    InvalidCursor,
    ModelTokens,
    OutcomeNotStored,
    Page,
    Swept,
    TaskRepository,
    sha256,
    storable,
)
from reasoning_agent.tasks.schemas import TaskIn, TaskOut
from reasoning_agent.tasks.status import ErrorType, TaskStatus

__all__ = ["Submitted", "TaskService", "Verdict", "request_hash"]

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    """What became of a submission."""

    COMPLETED = "completed"  # answered now
    ACCEPTED = "accepted"  # stored for the background (or already was, for this key)
    REPLAYED = "replayed"  # the answer of an earlier request with the same Idempotency-Key


@dataclass(frozen=True, slots=True)
class Submitted:
    task: Task
    verdict: Verdict
    headers: dict[str, str] = field(default_factory=dict)  # what the limits report


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One call to the agent: an answer or the error that says why there is none."""

    result: LLMResult | None
    error: LLMError | None
    seconds: float


def request_hash(body: TaskIn, model: str) -> str:
    """A digest of what was asked, so an Idempotency-Key reused for another request is caught."""
    return sha256(json.dumps({**body.model_dump(), "model": model}, sort_keys=True))


class TaskService:
    """Owns every task from submission to its final status."""

    def __init__(
        self,
        *,
        repository: TaskRepository,
        agent: ReasoningAgent,
        runner: Runner,
        quota: Quota,
        store_text: bool,
        max_prompt_chars: int,
        events: EventLog | None = None,
    ) -> None:
        self.repository = repository
        self.quota = quota
        self.events = events or EventLog()
        self._producers: dict[str, asyncio.Task[None]] = {}  # streamed tasks answering here
        # A stream cancelled through another process stops here at the next lease renewal.
        self.leases = Leases(repository, on_lost=self._stop_streams)
        self.agent = agent
        self.runner = runner
        self._store_text = store_text
        self._max_prompt_chars = max_prompt_chars

    async def submit(
        self,
        body: TaskIn,
        *,
        owner: str,
        background: bool,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> Submitted:
        """Store the task, then answer the prompt now or leave it to the background; a
        repeated Idempotency-Key gets the first request's task. Raises a ServiceError when
        there is no answer. The row is written before the LLM is called, on every path: a
        call that is paid for always has a task to be recorded on; and it is written only
        once the key's limits let it through (and its tokens are reserved)."""
        self._check(body, background=background)
        admitted = await self._admit(body, owner=owner)
        task, created, digest = await self._create(
            body,
            admitted,
            owner=owner,
            status=TaskStatus.QUEUED if background else TaskStatus.PENDING,
            idempotency_key=idempotency_key,
            trace_id=trace_id,
        )
        if not created:
            return self._replay(task, digest, background=background, headers=admitted.headers)
        if background:
            await self._enqueue(task)
            return Submitted(task, Verdict.ACCEPTED, admitted.headers)
        return await self._answer_now(task, body, headers=admitted.headers)

    async def _admit(self, body: TaskIn, *, owner: str) -> Admitted:
        return await self.quota.admit(
            owner,
            model=body.model or self.agent.default_model,
            prompt=body.prompt,
            system=body.system,
            max_tokens=body.max_tokens,
        )

    async def _create(
        self,
        body: TaskIn,
        admitted: Admitted,
        *,
        owner: str,
        status: TaskStatus,
        idempotency_key: str | None,
        trace_id: str | None,
        streamed: bool = False,
    ) -> tuple[Task, bool, str]:
        """The stored task, whether it is new, and the digest of the request. The tokens
        reserved for a task that was not stored (an error, an earlier task with the same
        Idempotency-Key) are given back."""
        model = admitted.model
        digest = request_hash(body, model)
        created = False
        try:
            task, created = await self.repository.create(
                owner=owner,
                prompt=body.prompt,
                system=body.system,
                model=model,
                temperature=body.temperature,
                max_tokens=admitted.max_tokens,
                reasoning_effort=body.reasoning_effort,
                dropped_params=self.agent.dropped_params(model, temperature=body.temperature),
                streamed=streamed,
                metadata=dict(body.metadata),
                digest=digest,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
                store_text=self._store_text,
                status=status,
                task_id=admitted.task_id,
                reserved_tokens=admitted.reserved_tokens,
            )
        finally:
            if not created and admitted.reserved_tokens is not None:
                await asyncio.shield(
                    self.quota.settle(
                        owner, admitted.task_id, admitted.reserved_tokens, result=None
                    )
                )
        return task, created, digest

    async def stream(
        self,
        body: TaskIn,
        *,
        owner: str,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> tuple[Submitted, AsyncIterator[TaskEvent]]:
        """Store the task and answer it in an asyncio task of its own, which outlives the
        request; the task and its events (`task`, `delta`s, then `done` or `error`). A
        repeated Idempotency-Key follows the first request's task instead."""
        self._check(body, background=False)
        admitted = await self._admit(body, owner=owner)
        task, created, digest = await self._create(
            body,
            admitted,
            owner=owner,
            status=TaskStatus.PENDING,
            idempotency_key=idempotency_key,
            trace_id=trace_id,
            streamed=True,
        )
        if not created:
            if task.request_hash != digest:
                raise InvalidRequest("Idempotency-Key was already used with a different request")
            return Submitted(task, Verdict.REPLAYED, admitted.headers), self._events_after(task, 0)
        await self.events.publish(task.id, "task", _shown(task))
        producer = asyncio.create_task(self._produce(task, body), name=f"stream {task.id}")
        self._producers[task.id] = producer
        producer.add_done_callback(lambda _: self._producers.pop(task.id, None))
        return Submitted(task, Verdict.ACCEPTED, admitted.headers), self.events.follow(task.id)

    async def _produce(self, task: Task, body: TaskIn) -> None:
        """Answer a streamed task, publishing each piece, then record and publish the end."""
        started, answered = time.monotonic(), list[str]()
        on_delta = self._publisher(task.id, answered)
        try:
            with self.leases.holding(task.id):
                outcome = await self._ask(
                    task, prompt=body.prompt, system=body.system, on_delta=on_delta
                )
                # Only while pending: a cancellation through another process wins.
                await self._record(
                    task, outcome, expect=TaskStatus.PENDING, partial="".join(answered)
                )
        except asyncio.CancelledError:
            await asyncio.shield(self._cancelled(task, started))
            raise
        except ServiceError as exc:  # the outcome could not be stored
            await self.events.publish(task.id, "error", exc.body())
            return
        except Exception:
            log.exception("streamed task %s failed unexpectedly", task.id)
            error = ServiceError("the task failed unexpectedly", extra={"task_id": task.id})
            await self.events.publish(task.id, "error", error.body())
            return
        if outcome.result is not None:
            self._show_unstored(task, body, outcome.result)
        await self._publish_end(task, unwritten=TaskStatus.PENDING)

    async def _publish_end(self, task: Task, *, unwritten: TaskStatus) -> None:
        """Publish the task's last event as stored; a task still `unwritten` after its outcome
        was recorded was cancelled meanwhile, and is read again."""
        if task.status == unwritten:
            task = await self.repository.get(task.owner, task.id) or task
        await self.events.publish(task.id, *_ending(task))

    def stop_stream(self, task_id: str) -> bool:
        """Stop a streamed task this process is answering (it is then marked cancelled);
        False if it is not answering it."""
        producer = self._producers.get(task_id)
        if producer is None or producer.done():
            return False
        producer.cancel()
        return True

    def _stop_streams(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            if self.stop_stream(task_id):
                log.info("streamed task %s was cancelled elsewhere: stopped", task_id)

    def _publisher(self, task_id: str, answered: list[str]) -> OnDelta:
        """What passes each piece of a task's answer on as a `delta` event (and keeps the
        answer's pieces in `answered`)."""

        async def on_delta(delta: Delta) -> None:
            if delta.reasoning:
                await self.events.publish(task_id, "delta", {"reasoning": delta.reasoning})
            if delta.text:
                answered.append(delta.text)
                await self.events.publish(task_id, "delta", {"text": delta.text})

        return on_delta

    async def _cancelled(self, task: Task, started: float) -> None:
        """A streamed task stopped by its caller: marked cancelled, its reservation given
        back, and its followers told."""
        try:
            await self.repository.cancel(task.owner, task.id, statuses=(TaskStatus.PENDING,))
            await self._release(task)
            task = await self.repository.get(task.owner, task.id) or task
        finally:
            await self.events.publish(task.id, "done", _shown(task))
        log.info(
            "streamed task %s cancelled after %.0f ms", task.id, (time.monotonic() - started) * 1000
        )

    async def events_of(
        self, owner: str, task_id: str, *, after: int = 0
    ) -> AsyncIterator[TaskEvent]:
        """The events of one of `owner`'s tasks after `after`, live until its end; NotFound
        (before any event) for another owner's task."""
        task = await self.get(owner, task_id)
        return self._events_after(task, after)

    async def _events_after(self, task: Task, after: int) -> AsyncIterator[TaskEvent]:
        """From the task's event log while there is one; without one (it ended long ago, is
        still queued, or runs where no log is shared) its start and end from the database,
        watching for a log to appear."""
        last = after
        while True:
            if await self.events.has(task.id):
                async for event in self.events.follow(task.id, after=last):
                    yield event
                    last = event.id
                    if event.ends:
                        return
            task = await self.repository.get(task.owner, task.id) or task
            if last < 1:
                yield TaskEvent(1, "task", _shown(task))
                last = 1
            if task.status not in (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING):
                break
            await asyncio.sleep(_POLL_S)
        yield TaskEvent(last + 1, *_ending(task))

    async def drain(self, *, timeout_s: float) -> None:
        """Let streamed tasks still answering finish, then cancel what is left."""
        if not self._producers:
            return
        _, late = await asyncio.wait(list(self._producers.values()), timeout=timeout_s)
        for producer in late:
            producer.cancel()
        if late:
            await asyncio.wait(late, timeout=5)

    def _check(self, body: TaskIn, *, background: bool) -> None:
        if len(body.prompt) > self._max_prompt_chars:
            raise PayloadTooLarge(f"prompt is longer than {self._max_prompt_chars} characters")
        if body.system and len(body.system) > self._max_prompt_chars:
            raise PayloadTooLarge(f"system is longer than {self._max_prompt_chars} characters")
        reason = self.agent.unconfigured_reason()
        if reason:
            raise ServiceUnavailable(f"the LLM provider is not configured: {reason}")
        if background and body.stream:
            raise InvalidRequest(
                "stream and mode async exclude each other: follow a background task with "
                "GET /task/{id}/events"
            )
        if background and not self._store_text:
            raise InvalidRequest(
                "background tasks need STORE_PROMPTS=true: the queued prompt is stored"
            )

    async def _enqueue(self, task: Task) -> None:
        try:
            await self.runner.submit(task.id)
        except Exception as exc:
            await self.repository.fail(
                task,
                error_type=ErrorType.UNAVAILABLE,
                message="the task queue is unavailable",
                attempts=0,
                latency_ms=0,
                expect=TaskStatus.QUEUED,
            )
            await self._release(task)
            raise ServiceUnavailable("the task queue is unavailable") from exc

    async def _release(self, task: Task) -> None:
        """Give back what a task that made no call (or whose call was stopped) reserved."""
        await self.quota.settle(task.owner, task.id, task.reserved_tokens, result=None)

    async def _answer_now(self, task: Task, body: TaskIn, *, headers: dict[str, str]) -> Submitted:
        started = time.monotonic()
        try:
            with self.leases.holding(task.id):
                # The texts from the request: with STORE_PROMPTS=false the row has none.
                outcome = await self._ask(task, prompt=body.prompt, system=body.system)
                metrics.note_llm_seconds(outcome.seconds)  # for the request's overhead histogram
                await self._record(task, outcome)
        except asyncio.CancelledError:
            await asyncio.shield(self._interrupted(task, started))
            raise
        if outcome.error is not None:
            error = for_llm_error(outcome.error)
            raise error(str(outcome.error), extra={"task_id": task.id}, headers=headers) from None
        assert outcome.result is not None
        self._show_unstored(task, body, outcome.result)
        return Submitted(task, Verdict.COMPLETED, headers)

    async def _interrupted(self, task: Task, started: float) -> None:
        """A request that went before its answer came: its task failed, its tokens back."""
        try:
            await self.repository.fail(
                task,
                error_type=ErrorType.INTERRUPTED,
                message="the request was cancelled before the answer came",
                attempts=0,
                latency_ms=round((time.monotonic() - started) * 1000, 2),
            )
        finally:
            await self._release(task)

    def _show_unstored(self, task: Task, body: TaskIn, result: LLMResult) -> None:
        """With STORE_PROMPTS=false the caller still gets its texts, as the database would
        have had them; the database never had them."""
        if self._store_text:
            return
        task.show_unstored(
            prompt=body.prompt,
            system=body.system,
            answer=storable(result.answer),
            reasoning=storable(result.reasoning) if result.reasoning is not None else None,
        )

    def _replay(
        self, task: Task, digest: str, *, background: bool, headers: dict[str, str]
    ) -> Submitted:
        """Answer a repeated Idempotency-Key as the first request was answered."""
        if task.request_hash != digest:
            raise InvalidRequest("Idempotency-Key was already used with a different request")
        if background:
            return Submitted(task, Verdict.ACCEPTED, headers)
        if task.status == TaskStatus.PENDING:
            raise Conflict("a request with this Idempotency-Key is still in progress")
        if task.status == TaskStatus.FAILED:
            error = for_error_type(task.error_type)
            raise error(task.error or "the task failed", extra={"task_id": task.id})
        return Submitted(task, Verdict.REPLAYED, headers)

    async def run(self, task_id: str) -> None:
        """Claim one background task and answer it; one cancelled meanwhile stays cancelled."""
        task = await self.repository.claim(task_id)
        if task is None:
            return  # cancelled, finished, or a live process has it
        assert task.prompt is not None, "background tasks need STORE_PROMPTS=true"
        await self.events.publish(task.id, "task", _shown(task))
        on_delta = self._publisher(task.id, [])
        with self.leases.holding(task.id):
            outcome = await self._ask(
                task, prompt=task.prompt, system=task.system, on_delta=on_delta
            )
            try:
                await self._record(task, outcome, expect=TaskStatus.RUNNING)
            except ServiceError as exc:  # recorded as far as the database allowed
                log.error("background task %s: %s", task.id, exc.message)
                await self.events.publish(task.id, "error", exc.body())
                return
        await self._publish_end(task, unwritten=TaskStatus.RUNNING)

    async def resume(self) -> int:
        """Hand the runner what a stopped process left queued."""
        ids = await self.repository.unfinished_ids(statuses=(TaskStatus.QUEUED,))
        for task_id in ids:
            await self.runner.submit(task_id)
        return len(ids)

    async def sweep(self, *, batch: int = 500) -> Swept:
        """Free what dead processes held, then look for each due queued task's job: a lost
        one (Redis evicted it, a process died with it) goes to the runner again, until its
        tries are used up."""
        swept = await self.repository.sweep()
        due = await self.repository.due_queued(limit=batch)
        live = await self.runner.alive([task_id for task_id, _ in due])
        lost = [(task_id, tries) for task_id, tries in due if task_id not in live]
        spent = [task_id for task_id, tries in lost if tries >= MAX_TRIES]
        again = [task_id for task_id, tries in lost if tries < MAX_TRIES]
        for task_id in again:
            await self.runner.submit(task_id)
        await self.repository.check_later([task_id for task_id, _ in due if task_id not in spent])
        failed = await self.repository.give_up(spent)
        for task_id, owner, reserved in failed:
            await self.quota.settle(owner, task_id, reserved, result=None)
        return Swept(
            failed=swept.failed + len(failed), requeued=swept.requeued, resubmitted=len(again)
        )

    async def get(self, owner: str, task_id: str) -> Task:
        task = await self.repository.get(owner, task_id)
        if task is None:
            raise NotFound("no such task")
        return task

    async def cancel(self, owner: str, task_id: str) -> Task:
        """Cancel a queued or running background task of `owner`'s, or a streamed one this
        process is answering (its upstream call stops)."""
        producer = self._producers.get(task_id)
        if producer is not None and (await self.get(owner, task_id)).status == TaskStatus.PENDING:
            self.stop_stream(task_id)
            await asyncio.wait([producer], timeout=10)
            return await self.get(owner, task_id)
        unfinished = (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.PENDING)
        if not await self.repository.cancel(owner, task_id, statuses=unfinished):
            task = await self.get(owner, task_id)
            raise Conflict(
                f"the task is {task.status}: only queued, running or streamed tasks can be "
                "cancelled"
            )
        await self._release(await self.get(owner, task_id))
        try:
            await self.runner.cancel(task_id)
        except Exception as exc:  # the row says cancelled: a job that runs later stops there
            log.warning("could not stop the job of a cancelled task: %s", exc.__class__.__name__)
        return await self.get(owner, task_id)

    async def tokens_by_model(self, owner: str, *, since: datetime) -> list[ModelTokens]:
        """What `owner`'s tasks since `since` used, model by model, as the upstream reported."""
        return await self.repository.tokens_by_model(owner, since=since)

    async def query(
        self,
        owner: str,
        *,
        text: str | None,
        status: TaskStatus | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> Page:
        """The owner's tasks, newest first."""
        if text is not None and "\x00" in text:
            raise InvalidRequest("q: must not contain NUL characters")
        try:
            return await self.repository.query(
                owner,
                text=text,
                status=status,
                since=since,
                until=until,
                limit=limit,
                cursor=cursor,
            )
        except InvalidCursor as exc:
            raise InvalidRequest(f"cursor: {exc}") from None

    async def _ask(
        self, task: Task, *, prompt: str, system: str | None, on_delta: OnDelta | None = None
    ) -> _Outcome:
        """Ask the agent as the stored task says (model, temperature, max_tokens)."""
        started = time.monotonic()
        try:
            result = await self.agent.run(
                prompt,
                system=system,
                model=task.model,
                temperature=task.temperature,
                max_tokens=task.max_tokens,
                reasoning_effort=task.reasoning_effort,
                on_delta=on_delta,
            )
        except LLMError as exc:
            return _Outcome(None, exc, time.monotonic() - started)
        return _Outcome(result, None, time.monotonic() - started)

    async def _record(
        self,
        task: Task,
        outcome: _Outcome,
        *,
        expect: TaskStatus | None = None,
        partial: str | None = None,
    ) -> None:
        """Store the outcome on the task and count it (a failure with the `partial` answer a
        stream passed on). With `expect`, a task no longer in that status (cancelled
        meanwhile) is left as it is."""
        try:
            await self._store_outcome(task, outcome, expect=expect, partial=partial)
        finally:  # the call was made: its reservation settles whether or not the row took it
            if task.reserved_tokens is not None:  # a shield is a task of its own: only if needed
                await asyncio.shield(
                    self.quota.settle(
                        task.owner, task.id, task.reserved_tokens, result=outcome.result
                    )
                )

    async def _store_outcome(
        self, task: Task, outcome: _Outcome, *, expect: TaskStatus | None, partial: str | None
    ) -> None:
        provider = self.agent.provider.name
        model, seconds = metrics.model_label(task.model), outcome.seconds
        latency_ms = round(seconds * 1000, 2)
        metrics.LLM_SECONDS.labels(provider, model).observe(seconds)
        if outcome.error is not None:
            error_type = outcome.error.code
            metrics.LLM_CALLS.labels(provider, model, error_type).inc()
            try:
                failed = await self.repository.fail(
                    task,
                    error_type=error_type,
                    message=str(outcome.error),
                    attempts=outcome.error.attempts,
                    latency_ms=latency_ms,
                    expect=expect,
                    partial=partial,
                    store_text=self._store_text,
                )
            except OutcomeNotStored as exc:
                raise await self._not_stored(task, exc, outcome, expect=expect) from None
            if failed:
                metrics.TASKS.labels(TaskStatus.FAILED).inc()
            return
        result = outcome.result
        assert result is not None
        metrics.LLM_CALLS.labels(provider, model, "ok").inc()
        metrics.TOKENS.labels(task.owner, "input").inc(result.prompt_tokens or 0)
        metrics.TOKENS.labels(task.owner, "output").inc(result.completion_tokens or 0)
        if result.reasoning_tokens:  # a part of the output, counted apart as well
            metrics.TOKENS.labels(task.owner, "reasoning").inc(result.reasoning_tokens)
        try:
            done = await self.repository.complete(
                task, result, latency_ms=latency_ms, store_text=self._store_text, expect=expect
            )
        except OutcomeNotStored as exc:
            raise await self._not_stored(task, exc, outcome, expect=expect) from None
        if done:
            metrics.TASKS.labels(TaskStatus.COMPLETED).inc()

    async def _not_stored(
        self, task: Task, exc: OutcomeNotStored, outcome: _Outcome, *, expect: TaskStatus | None
    ) -> ServiceError:
        """The outcome's write failed: a database that still answers records a `store_error`
        instead, so no task it can reach stays unfinished. The error to answer with."""
        metrics.DATABASE_ERRORS.inc()
        log.error("could not store the outcome of task %s: %s", task.id, exc)
        extra = {"task_id": task.id}
        if exc.reachable:
            message = "the database refused to store the upstream's answer"
            called = outcome.error or outcome.result
            assert called is not None
            with contextlib.suppress(OutcomeNotStored):
                if await self.repository.fail(
                    task,
                    error_type=ErrorType.STORE_ERROR,
                    message=message,
                    attempts=called.attempts,
                    latency_ms=round(outcome.seconds * 1000, 2),
                    expect=expect,
                ):
                    metrics.TASKS.labels(TaskStatus.FAILED).inc()
                return StoreFailed(message, extra=extra)
        return DatabaseUnavailable(
            "the database is not reachable now: the task's outcome was not stored", extra=extra
        )


_POLL_S = 1.0  # how often a task followed from the database is read again


def _shown(task: Task) -> dict[str, Any]:
    """The task as the API shows it, for an event."""
    return TaskOut.of(task).model_dump(mode="json")


def _ending(task: Task) -> tuple[Kind, dict[str, Any]]:
    """A finished task's last event: `error` with the usual body for a failed one, else
    `done` with the task."""
    if task.status == TaskStatus.FAILED:
        error = for_error_type(task.error_type)
        return "error", error(task.error or "the task failed", extra={"task_id": task.id}).body()
    return "done", _shown(task)
