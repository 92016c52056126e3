"""SQLite writes on the event loop: they never wait there for a lock, and the WAL stays bounded."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reasoning_agent import db, tasks
from reasoning_agent.schemas import TaskIn
from tests.support import cyclic_garbage

# Its subject is SQLite's write path: `make test-postgres` deselects it.
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A migrated SQLite database of the test's own."""
    db.migrate(f"sqlite:///{tmp_path / 'tasks.db'}")
    return tmp_path / "tasks.db"


@pytest.fixture
def blocker(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection: BEGIN IMMEDIATE on it holds the write lock."""
    connection = sqlite3.connect(path, isolation_level=None)
    yield connection
    connection.close()


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


def test_a_write_behind_another_writer_waits_in_a_thread_while_the_loop_runs(
    path: Path, blocker: sqlite3.Connection
) -> None:
    async def run() -> tuple[float, bool, str]:
        database = db.Database(f"sqlite:///{path}")
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            write = asyncio.create_task(_store(database, "behind a lock"))
            started = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.01)  # the loop keeps turning while the write waits
            ticking = time.monotonic() - started
            waiting = not write.done()
            blocker.execute("COMMIT")
            return ticking, waiting, await asyncio.wait_for(write, 10)
        finally:
            await database.aclose()

    ticking, waiting, task_id = asyncio.run(run())
    assert waiting
    assert ticking < 1.0
    assert blocker.execute("SELECT prompt FROM tasks WHERE id = ?", (task_id,)).fetchall() == [
        ("behind a lock",)
    ]


def test_a_write_that_meets_a_busy_lock_leaves_nothing_for_the_cyclic_collector(
    path: Path, blocker: sqlite3.Connection
) -> None:
    async def run() -> list[str]:
        database = db.Database(f"sqlite:///{path}")
        try:
            await _store(database, "warm")
            with cyclic_garbage("sqlalchemy", "sqlite3", "reasoning_agent") as found:
                blocker.execute("BEGIN IMMEDIATE")
                write = asyncio.create_task(_store(database, "behind a lock"))
                await asyncio.sleep(0.05)  # every inline try has met the lock by now
                blocker.execute("COMMIT")
                await asyncio.wait_for(write, 10)
            return found
        finally:
            await database.aclose()

    assert asyncio.run(run()) == []
    assert blocker.execute("SELECT count(*) FROM tasks").fetchall() == [(2,)]


def test_the_wal_is_checkpointed_though_the_loop_never_checkpoints(path: Path) -> None:
    async def run() -> int:
        database = db.Database(f"sqlite:///{path}")
        try:
            for i in range(4000):  # ~7 pages each: 110 MB of WAL if nothing checkpointed
                await _store(database, f"prompt {i}")
            return Path(f"{path}-wal").stat().st_size
        finally:
            await database.aclose()

    wal_bytes = asyncio.run(run())
    assert wal_bytes < 40 * 2**20
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT count(*) FROM tasks").fetchall() == [(4000,)]
