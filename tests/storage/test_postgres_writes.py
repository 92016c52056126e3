"""PostgreSQL writes: a task's two writes are one statement each, the writes of one loop turn
share one commit, they survive the server closing their connections, and errors come as
SQLAlchemy's, without the statement's values."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

from reasoning_agent.storage import db
from reasoning_agent.tasks.repository import TaskRepository
from tests.fake_openai import FakeOpenAI
from tests.inprocess import running
from tests.support import OwnPostgres, drop_postgres_database, free_port, postgres_database
from tests.tasks.factories import new_task

from ..conftest import base_env


@pytest.fixture
def url() -> Iterator[str]:
    url = postgres_database()
    db.migrate(url)
    yield url
    drop_postgres_database(url)


def _statements(url: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(
                "SELECT query, calls FROM pg_stat_statements JOIN pg_database d ON d.oid = dbid"
                " WHERE d.datname = current_database() AND query NOT LIKE '%pg_stat_statements%'"
            )
        finally:
            await connection.close()
        return {row["query"]: row["calls"] for row in rows}

    return asyncio.run(read())


def _run(url: str, sql: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def counted() -> Iterator[str]:
    """A server of the module's own that counts every statement (pg_stat_statements)."""
    postgres = OwnPostgres().start(
        "shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track_utility=on"
    )
    try:
        _run(postgres.url, "CREATE EXTENSION pg_stat_statements")
        yield postgres.url
    finally:
        postgres.close()


def test_a_task_answered_now_costs_two_statements_and_no_transaction_control(
    upstream: FakeOpenAI, counted: str
) -> None:
    with running(base_env(upstream, counted)) as app, app.client() as client:
        assert client.post("/task", json={"prompt": "warm up"}).status_code == 200
        _run(counted, "SELECT pg_stat_statements_reset()")
        for i in range(10):
            assert client.post("/task", json={"prompt": f"task {i}"}).status_code == 200
        statements = _statements(counted)
    inserts = {q: n for q, n in statements.items() if q.startswith("INSERT INTO tasks")}
    updates = {q: n for q, n in statements.items() if q.startswith("UPDATE tasks SET status")}
    assert sum(inserts.values()) == 10, statements
    assert sum(updates.values()) == 10, statements
    # Neither BEGIN/COMMIT around them nor a ping before them.
    others = set(statements) - set(inserts) - set(updates)
    assert not {q for q in others if q.split()[0].upper() in ("BEGIN", "COMMIT", "SELECT")}, others


def test_the_writes_of_one_turn_share_a_commit_and_each_keeps_its_own_outcome(
    counted: str,
) -> None:
    _run(counted, "CREATE DATABASE grouped")
    counted = counted.rsplit("/", 1)[0] + "/grouped"  # apart from the other test's tasks
    _run(counted, "CREATE EXTENSION pg_stat_statements")
    db.migrate(counted)

    async def run() -> tuple[dict[str, int], list[Any], list[str]]:
        database = db.Database(counted)
        repository = TaskRepository(database)
        try:
            _, first = await new_task(repository, task_id="first")
            await asyncio.to_thread(_run, counted, "SELECT pg_stat_statements_reset()")
            together = await asyncio.gather(
                *(new_task(repository, task_id=f"together-{i}") for i in range(8))
            )
            statements = await asyncio.to_thread(_statements, counted)
            # One of a turn's writes refused: only that one fails.
            outcomes = await asyncio.gather(
                *(new_task(repository, task_id=f"next-{i}") for i in range(3)),
                new_task(repository, task_id="first"),
                return_exceptions=True,
            )
            stored = [row[0] for row in await asyncio.to_thread(_ids, counted)]
            return statements, [first, *(c for _, c in together), *outcomes], stored
        finally:
            await database.aclose()

    statements, outcomes, stored = asyncio.run(run())
    assert statements.get("BEGIN") == 1, statements
    assert statements.get("COMMIT") == 1, statements
    inserts = sum(n for q, n in statements.items() if q.startswith("INSERT INTO tasks"))
    assert inserts == 8, statements
    assert outcomes[:9] == [True] * 9
    assert [created for _, created in outcomes[9:12]] == [True] * 3
    assert isinstance(outcomes[12], IntegrityError), outcomes[12]
    assert sorted(stored) == sorted(
        ["first", *(f"together-{i}" for i in range(8)), *(f"next-{i}" for i in range(3))]
    )


def test_writes_go_on_after_the_server_closed_their_connections(url: str) -> None:
    async def run() -> int:
        database = db.Database(url)
        repository = TaskRepository(database)
        try:
            await asyncio.gather(*(new_task(repository, prompt=f"before {i}") for i in range(8)))
            connection = await asyncpg.connect(url)
            try:  # as a restart or a failover does to every connection
                closed = await connection.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            finally:
                await connection.close()
            await asyncio.sleep(0.2)  # the loop reads each connection's end
            await asyncio.gather(*(new_task(repository, prompt=f"after {i}") for i in range(8)))
            return int(closed)
        finally:
            await database.aclose()

    assert asyncio.run(run()) >= 1


def _ids(url: str) -> list[Any]:
    async def read() -> list[Any]:
        connection = await asyncpg.connect(url)
        try:
            return list(await connection.fetch("SELECT id FROM tasks"))
        finally:
            await connection.close()

    return asyncio.run(read())


def test_errors_are_sqlalchemys_and_never_show_the_values(url: str) -> None:
    async def run() -> list[Exception]:
        database = db.Database(url)
        repository = TaskRepository(database)
        try:
            await new_task(repository, prompt="a secret prompt", task_id="t1")
            with pytest.raises(IntegrityError) as duplicate:
                await new_task(repository, prompt="a secret prompt", task_id="t1")
            with pytest.raises(DatabaseError) as refused:  # an owner is 64 characters at most
                await new_task(repository, prompt="a secret prompt", task_id="t2", owner="x" * 65)
            return [duplicate.value, refused.value]
        finally:
            await database.aclose()

    errors = asyncio.run(run())
    assert not isinstance(errors[1], OperationalError)  # refused, not unavailable
    for error in errors:
        assert "a secret prompt" not in str(error)


def test_an_unreachable_server_is_an_operational_error() -> None:
    async def run() -> None:
        database = db.Database(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
        try:
            with pytest.raises(OperationalError):
                await new_task(TaskRepository(database), prompt="nowhere")
        finally:
            await database.aclose()

    asyncio.run(run())
