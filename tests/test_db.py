"""SQLite writes on the event loop: committed in groups, never waiting there for a lock, and
the WAL stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, insert
from sqlalchemy.exc import IntegrityError

from reasoning_agent import db, tasks
from reasoning_agent.models import Task
from reasoning_agent.schemas import TaskIn

# Its subject is SQLite's write path: `make test-postgres` deselects it.
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A migrated SQLite file."""
    path = tmp_path / "tasks.db"
    db.migrate(f"sqlite:///{path}")
    return path


@contextlib.asynccontextmanager
async def _database(path: Path) -> AsyncIterator[db.Database]:
    database = db.Database(f"sqlite:///{path}")
    try:
        yield database
    finally:
        await database.aclose()


def _ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as check:
        return {row[0] for row in check.execute("SELECT id FROM tasks")}


async def _store(database: db.Database, prompt: str) -> str:
    task, created = await tasks.create_pending(
        database,
        owner="alice",
        body=TaskIn(prompt=prompt),
        model="m",
        digest="d",
        idempotency_key=None,
    )
    assert created
    return task.id


def _row(task_id: str) -> dict[str, object]:
    return {
        "id": task_id,
        "owner": "alice",
        "request_hash": "d",
        "status": "pending",
        "prompt_chars": 1,
        "prompt_sha256": "s",
        "model": "m",
        "metadata": {},
        "attempts": 0,
        "created_at": datetime.now(UTC),
    }


def test_a_write_behind_another_writer_waits_in_a_thread_while_the_loop_runs(
    path: Path,
) -> None:
    blocker = sqlite3.connect(path, isolation_level=None)

    async def run() -> tuple[float, bool, str]:
        async with _database(path) as database:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            write = asyncio.create_task(_store(database, "behind a lock"))
            started = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.01)  # the loop keeps turning while the write waits
            ticking = time.monotonic() - started
            waiting = not write.done()
            blocker.execute("COMMIT")
            return ticking, waiting, await asyncio.wait_for(write, 10)

    ticking, waiting, task_id = asyncio.run(run())
    assert waiting
    assert ticking < 1.0
    assert blocker.execute("SELECT prompt FROM tasks WHERE id = ?", (task_id,)).fetchall() == [
        ("behind a lock",)
    ]


def test_the_wal_is_checkpointed_though_the_loop_never_checkpoints(path: Path) -> None:
    async def run() -> int:
        async with _database(path) as database:
            for i in range(4000):  # ~7 pages each: 110 MB of WAL if nothing checkpointed
                await _store(database, f"prompt {i}")
            return Path(f"{path}-wal").stat().st_size

    wal_bytes = asyncio.run(run())
    assert wal_bytes < 40 * 2**20
    assert len(_ids(path)) == 4000


def test_writes_made_together_share_one_commit_and_a_bad_one_fails_alone(path: Path) -> None:
    commits: list[object] = []

    async def run() -> tuple[list[str], int, list[object]]:
        async with _database(path) as database:
            for engine in database.engines:
                event.listen(engine, "commit", commits.append)
            first = await asyncio.gather(*(_store(database, f"first {i}") for i in range(20)))
            group_commits = len(commits)
            second = [_store(database, f"second {i}") for i in range(20)]
            duplicate = database.write(insert(Task.__table__), _row(first[0]))
            return (
                first,
                group_commits,
                await asyncio.gather(*second, duplicate, return_exceptions=True),
            )

    first, group_commits, (*second, duplicate) = asyncio.run(run())
    assert group_commits == 1
    assert isinstance(duplicate, IntegrityError)
    assert all(isinstance(task_id, str) for task_id in second)
    # The duplicate rolled its group back; then each write ran on its own.
    assert len(commits) == 1 + 20
    assert _ids(path) == {*first, *second}


def test_a_write_whose_caller_is_gone_before_the_commit_is_not_made(path: Path) -> None:
    async def run() -> str:
        async with _database(path) as database:
            dropped = asyncio.create_task(database.write(insert(Task.__table__), _row("gone")))
            await asyncio.sleep(0)  # it is queued for the next turn's commit
            dropped.cancel()
            return await _store(database, "kept")

    kept = asyncio.run(run())
    assert _ids(path) == {kept}
