"""The task repository on the real database: idempotency under a race, conditional finishes,
one claim per task, and the sweep's horizons."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reasoning_agent.llm import LLMResult
from reasoning_agent.storage import db
from reasoning_agent.tasks.models import Task
from reasoning_agent.tasks.repository import TaskRepository
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
        claims = await asyncio.gather(
            *(repository.claim(task.id, statuses=(TaskStatus.QUEUED,)) for _ in range(4))
        )
        return list(claims), await repository.get("bob", task.id)

    claims, seen_by_bob = with_repository(url, body)
    won = [claim for claim in claims if claim is not None]
    assert len(won) == 1 and won[0].status is TaskStatus.RUNNING
    assert won[0].metadata_ == {"team": "a"} and won[0].usage is None
    assert seen_by_bob is None


def test_the_sweep_fails_only_what_is_past_its_horizon(url: str) -> None:
    async def body(repository: TaskRepository) -> int:
        for status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.QUEUED):
            await new_task(repository, status=status, prompt=f"old {status}")
        await new_task(repository, status=TaskStatus.PENDING, prompt="young")
        return 0

    with_repository(url, body)
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    offset = "" if url.startswith("sqlite") else "+00"  # SQLite keeps UTC without an offset
    query(url, f"UPDATE tasks SET created_at = '{an_hour_ago}{offset}' WHERE prompt LIKE 'old%'")

    failed = with_repository(
        url,
        lambda r: r.fail_interrupted(
            pending_after=timedelta(minutes=5), running_after=timedelta(minutes=5)
        ),
    )
    assert failed == 2  # the old pending and running ones; queued waits for a runner
    rows = query(url, "SELECT prompt, status, error_type FROM tasks ORDER BY prompt")
    assert rows == [
        ("old pending", "failed", "interrupted"),
        ("old queued", "queued", None),
        ("old running", "failed", "interrupted"),
        ("young", "pending", None),
    ]
