"""SQLite writes on the event loop: they never wait there for a lock, the WAL stays bounded,
and errors never show the values."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from reasoning_agent.storage import db
from reasoning_agent.storage.sqlite_writes import SQLiteWrites
from reasoning_agent.tasks.repository import TaskRepository
from tests.support import cyclic_garbage, query, write_lock
from tests.tasks.factories import new_task

# Its subject is SQLite's write path: `make test-postgres` deselects it.
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A migrated SQLite database of the test's own."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    db.migrate(url)
    return url


async def _store(database: db.Database, prompt: str) -> str:
    task, created = await new_task(TaskRepository(database), prompt=prompt)
    assert created
    return task.id


async def _store_many(database: db.Database, n: int) -> None:
    for i in range(n):
        await _store(database, f"prompt {i}")


def test_a_write_behind_another_writer_waits_in_a_thread_while_the_loop_runs(url: str) -> None:
    async def run() -> tuple[float, bool, str]:
        database = db.Database(url)
        try:
            with write_lock(url):  # another process holds the write lock
                write = asyncio.create_task(_store(database, "behind a lock"))
                started = time.monotonic()
                for _ in range(20):
                    await asyncio.sleep(0.01)  # the loop keeps turning while the write waits
                ticking = time.monotonic() - started
                waiting = not write.done()
            return ticking, waiting, await asyncio.wait_for(write, 10)
        finally:
            await database.aclose()

    ticking, waiting, task_id = asyncio.run(run())
    assert waiting
    assert ticking < 1.0
    assert query(url, f"SELECT prompt FROM tasks WHERE id = '{task_id}'") == [("behind a lock",)]


def test_a_write_that_meets_a_busy_lock_leaves_nothing_for_the_cyclic_collector(
    url: str,
) -> None:
    async def run() -> list[str]:
        database = db.Database(url)
        try:
            await _store(database, "warm")
            with cyclic_garbage("sqlalchemy", "sqlite3", "reasoning_agent") as found:
                with write_lock(url):
                    write = asyncio.create_task(_store(database, "behind a lock"))
                    await asyncio.sleep(0.05)  # every inline try has met the lock by now
                await asyncio.wait_for(write, 10)
            return found
        finally:
            await database.aclose()

    assert asyncio.run(run()) == []
    assert query(url, "SELECT count(*) FROM tasks") == [(2,)]


def test_the_wal_is_checkpointed_though_the_loop_never_checkpoints(url: str) -> None:
    path = url.removeprefix("sqlite:///")

    async def run() -> int:
        database = db.Database(url)
        try:
            await _store_many(database, 4000)  # ~7 pages each: 110 MB of WAL, unchecked
            return Path(f"{path}-wal").stat().st_size
        finally:
            await database.aclose()

    wal_bytes = asyncio.run(run())
    assert wal_bytes < 40 * 2**20
    assert query(url, "SELECT count(*) FROM tasks") == [(4000,)]


def test_writes_wait_for_a_checkpoint_that_lags(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk slow to sync: writes stop CHECKPOINT_LAG writes into a running checkpoint
    rather than let the WAL grow while it runs."""
    synced = threading.Event()
    checkpoint = SQLiteWrites._run_checkpoint

    def on_a_slow_disk(self: SQLiteWrites) -> None:
        synced.wait(10)
        checkpoint(self)

    monkeypatch.setattr(SQLiteWrites, "_run_checkpoint", on_a_slow_disk)
    every, lag = SQLiteWrites.CHECKPOINT_EVERY, SQLiteWrites.CHECKPOINT_LAG

    async def run() -> list[tuple]:
        database = db.Database(url)
        try:
            writes = asyncio.create_task(_store_many(database, every + 2 * lag))
            await asyncio.wait([writes], timeout=2)  # ample for them all, if none waited
            stored = query(url, "SELECT count(*) FROM tasks")
            synced.set()
            await asyncio.wait_for(writes, 10)
            return stored
        finally:
            synced.set()
            await database.aclose()

    assert asyncio.run(run()) == [(every + lag,)]
    assert query(url, "SELECT count(*) FROM tasks") == [(every + 2 * lag,)]


def test_errors_are_sqlalchemys_and_never_show_the_values(url: str) -> None:
    """On the loop and in the thread that waits behind another writer."""

    async def run() -> list[Exception]:
        database = db.Database(url)
        repository = TaskRepository(database)
        try:
            await new_task(repository, prompt="a secret prompt", task_id="t1")
            with pytest.raises(IntegrityError) as inline:
                await new_task(repository, prompt="a secret prompt", task_id="t1")
            with write_lock(url):
                waiting = asyncio.create_task(
                    new_task(repository, prompt="a secret prompt", task_id="t1")
                )
                await asyncio.sleep(0.1)  # past the inline tries: the thread waits
            with pytest.raises(IntegrityError) as behind:
                await asyncio.wait_for(waiting, 10)
            return [inline.value, behind.value]
        finally:
            await database.aclose()

    errors = asyncio.run(run())
    for error in errors:
        assert "a secret prompt" not in str(error)
        assert "UNIQUE constraint failed" in str(error)
