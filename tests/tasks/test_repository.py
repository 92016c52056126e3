"""The task repository on the real database: idempotency under a race, conditional finishes,
one claim per task, and leases: renewed, lapsed, held by a dead process, used up."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reasoning_agent.llm import LLMResult
from reasoning_agent.storage import db
from reasoning_agent.tasks.leases import MAX_TRIES
from reasoning_agent.tasks.models import Task
from reasoning_agent.tasks.repository import GAVE_UP, INTERRUPTED, Swept, TaskRepository
from reasoning_agent.tasks.status import ErrorType, TaskStatus
from tests.support import drop_database, new_database, query
from tests.tasks.factories import new_task

Body = Callable[[TaskRepository], Awaitable[Any]]


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    url = new_database(tmp_path)
    db.migrate(url)
    yield url
    drop_database(url)


def with_repository(url: str, body: Body) -> Any:
    async def run() -> Any:
        database = db.Database(url)
        try:
            return await body(TaskRepository(database))
        finally:
            await database.aclose()

    return asyncio.run(run())


def test_racing_creates_with_one_idempotency_key_store_one_task(url: str) -> None:
    async def race(repository: TaskRepository) -> list[tuple[Task, bool]]:
        return list(await asyncio.gather(*(new_task(repository, key="k") for _ in range(8))))

    results = with_repository(url, race)
    assert [created for _, created in results].count(True) == 1
    assert len({task.id for task, _ in results}) == 1
    assert query(url, "SELECT count(*) FROM tasks") == [(1,)]


def test_a_finish_that_expects_another_status_changes_nothing(url: str) -> None:
    result = LLMResult(answer="a", model="m", prompt_tokens=1, completion_tokens=2, attempts=1)

    async def body(repository: TaskRepository) -> tuple[bool, bool, Task | None]:
        task, _ = await new_task(repository, status=TaskStatus.QUEUED)
        assert await repository.cancel("alice", task.id)
        late = await repository.complete(
            task, result, latency_ms=1.0, store_text=True, expect=TaskStatus.RUNNING
        )
        failed = await repository.fail(
            task,
            error_type=ErrorType.UPSTREAM_ERROR,
            message="x",
            attempts=1,
            latency_ms=1.0,
            expect=TaskStatus.RUNNING,
        )
        return late, failed, await repository.get("alice", task.id)

    late, failed, stored = with_repository(url, body)
    assert (late, failed) == (False, False)
    assert stored is not None and stored.status is TaskStatus.CANCELLED
    assert stored.error_type is ErrorType.CANCELLED and stored.answer is None


def test_one_claim_wins_and_another_owner_sees_nothing(url: str) -> None:
    async def body(repository: TaskRepository) -> tuple[list[Task | None], Task | None]:
        task, _ = await new_task(repository, status=TaskStatus.QUEUED)
        claims = await asyncio.gather(*(repository.claim(task.id) for _ in range(4)))
        return list(claims), await repository.get("bob", task.id)

    claims, seen_by_bob = with_repository(url, body)
    won = [claim for claim in claims if claim is not None]
    assert len(won) == 1 and won[0].status is TaskStatus.RUNNING
    assert won[0].metadata_ == {"team": "a"} and won[0].usage is None
    assert seen_by_bob is None


ELSEWHERE = "another-host:1:0000"  # a holder this host cannot see: only its lease counts


def test_held_leases_keep_their_tasks_and_lapsed_ones_are_freed(url: str) -> None:
    """A pending task's request is gone with its process: failed. A background one is queued
    again, due for a runner at once, and its next claim counts a second try."""

    async def body(_: TaskRepository) -> tuple[Any, ...]:
        database = db.Database(url)
        holder = TaskRepository(database, holder=ELSEWHERE, lease_s=0.6)
        sweeper = TaskRepository(database)
        try:
            pending, _ = await new_task(holder, prompt="pending")
            queued, _ = await new_task(holder, status=TaskStatus.QUEUED, prompt="running")
            assert await holder.claim(queued.id) is not None
            for _ in range(6):  # 1.2 s, twice the lease, renewed as a live process does
                await asyncio.sleep(0.2)
                assert await holder.renew([pending.id, queued.id]) == {pending.id, queued.id}
                assert await sweeper.sweep() == Swept(failed=0, requeued=0)
            await asyncio.sleep(0.7)  # the holder stopped renewing: it is gone
            swept = await sweeper.sweep()
            due = await sweeper.due_queued(limit=10)
            again = await sweeper.claim(queued.id)
            late = await holder.complete(
                queued,
                LLMResult(
                    answer="late", model="m", prompt_tokens=1, completion_tokens=1, attempts=1
                ),
                latency_ms=1.0,
                store_text=True,
                expect=TaskStatus.RUNNING,
            )
            return swept, due, again, late, queued.id
        finally:
            await database.aclose()

    swept, due, again, late, running_id = with_repository(url, body)
    assert swept == Swept(failed=1, requeued=1)
    assert due == [(running_id, 1)]
    assert again is not None and again.tries == 2 and again.status is TaskStatus.RUNNING
    assert late is False  # the process that lost its lease cannot overwrite the new run
    rows = query(url, "SELECT prompt, status, error FROM tasks ORDER BY prompt")
    assert rows == [("pending", "failed", INTERRUPTED), ("running", "running", None)]


def test_a_dead_process_on_this_host_frees_its_tasks_at_once(url: str) -> None:
    """A restarted process (same host, its old pid gone or reused by itself) does not wait
    out the lease; a live sibling's tasks and a foreign host's are left to their leases."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    unreaped = subprocess.Popen([sys.executable, "-c", "pass"])  # a zombie until waited for
    while Path(f"/proc/{unreaped.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.01)
    host = socket.gethostname()
    holders = {
        "dead pid": f"{host}:{gone.pid}:0000",
        "dead, not yet reaped": f"{host}:{unreaped.pid}:0000",
        "my pid, earlier life": f"{host}:{os.getpid()}:0000",
        "live sibling": f"{host}:{alive.pid}:0000",
        "another host": ELSEWHERE,
    }

    async def body(_: TaskRepository) -> Swept:
        database = db.Database(url)
        try:
            for prompt, holder in holders.items():
                await new_task(TaskRepository(database, holder=holder), prompt=prompt)
            return await TaskRepository(database).sweep()
        finally:
            await database.aclose()

    try:
        swept = with_repository(url, body)
    finally:
        alive.kill()
        alive.wait()
        unreaped.wait()
    assert swept == Swept(failed=3, requeued=0)
    rows = query(url, "SELECT prompt, status FROM tasks ORDER BY prompt")
    assert rows == [
        ("another host", "pending"),
        ("dead pid", "failed"),
        ("dead, not yet reaped", "failed"),
        ("live sibling", "pending"),
        ("my pid, earlier life", "failed"),
    ]


def test_a_task_whose_runs_all_died_fails_instead_of_queueing_again(url: str) -> None:
    async def body(repository: TaskRepository) -> Swept:
        task, _ = await new_task(repository, status=TaskStatus.QUEUED)
        await repository.claim(task.id)
        return Swept(failed=0, requeued=0)

    with_repository(url, body)
    query(url, f"UPDATE tasks SET tries = {MAX_TRIES}, lease_until = {_an_hour_ago(url)}")
    assert with_repository(url, lambda r: r.sweep()) == Swept(failed=1, requeued=0)
    assert query(url, "SELECT status, error FROM tasks") == [("failed", GAVE_UP)]


def test_rows_from_before_leases_are_freed_only_past_the_legacy_horizon(url: str) -> None:
    async def body(repository: TaskRepository) -> None:
        for status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.QUEUED):
            await new_task(repository, status=status, prompt=f"old {status}")
        await new_task(repository, status=TaskStatus.PENDING, prompt="young")

    with_repository(url, body)
    query(url, "UPDATE tasks SET holder = NULL, lease_until = NULL")
    query(url, f"UPDATE tasks SET created_at = {_an_hour_ago(url, 61)} WHERE prompt LIKE 'old%'")

    swept = with_repository(url, lambda r: r.sweep())
    assert swept == Swept(failed=1, requeued=1)
    rows = query(url, "SELECT prompt, status, error_type FROM tasks ORDER BY prompt")
    assert rows == [
        ("old pending", "failed", "interrupted"),
        ("old queued", "queued", None),
        ("old running", "queued", None),
        ("young", "pending", None),
    ]
    due = with_repository(url, lambda r: r.due_queued(limit=10))
    assert len(due) == 2  # both queued ones are looked for in the runner now


def _an_hour_ago(url: str, minutes: int = 60) -> str:
    """A UTC time as a SQL literal, in the form each database keeps it."""
    moment = (datetime.now(UTC) - timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S")
    offset = "" if url.startswith("sqlite") else "+00"  # SQLite keeps UTC without an offset
    return f"'{moment}{offset}'"
