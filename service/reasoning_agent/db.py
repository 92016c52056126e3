"""The database (SQLite or PostgreSQL): its engine, sessions, fast writes, and migrations."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Engine, Executable, event, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = [
    "Database",
    "async_url",
    "create_engine",
    "display_url",
    "migrate",
    "ping",
    "session_factory",
]

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=30000",
    "PRAGMA foreign_keys=ON",
)


def async_url(url: str) -> URL:
    """Turn the user's `sqlite://` or `postgresql://` URL into one with an async driver."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database: {parsed.get_backend_name()}")


def display_url(url: str) -> str:
    """The URL with its password hidden, safe for logs."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str, **options: Any) -> AsyncEngine:
    """An engine; SQLite gets WAL and a busy timeout so several workers can write at once."""
    target = async_url(url)
    if target.get_backend_name() != "sqlite":
        return create_async_engine(target, pool_pre_ping=True, **options)
    if target.database and target.database != ":memory:":
        Path(target.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(target, connect_args={"timeout": 30}, **options)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in _SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


class Database:
    """The engine and its sessions for everything, plus `write()` for the short write
    transactions every task makes, taken the cheapest way the database allows."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.sessions = session_factory(self.engine)
        self._sqlite = (
            _SQLiteWrites(self.engine.url) if self.engine.dialect.name == "sqlite" else None
        )

    @property
    def engines(self) -> list[Engine]:
        """Every sync engine underneath, for instrumentation."""
        return [self.engine.sync_engine, *(self._sqlite.engines if self._sqlite else [])]

    async def write(self, statement: Executable, params: dict[str, Any]) -> int:
        """Run one statement in its own transaction and commit; the number of rows it matched."""
        if self._sqlite is not None:
            return await self._sqlite.write(statement, params)
        async with self.engine.begin() as connection:
            result = await connection.execute(statement, params)
        return int(result.rowcount)

    async def aclose(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        await self.engine.dispose()


class _SQLiteWrites:
    """Short write transactions on SQLite without aiosqlite's two thread hand-offs per DBAPI
    call (they cost more CPU than the SQL itself).

    A write is tried right here on the event loop with busy_timeout=0: it takes the write
    lock at once and commits in tens of microseconds (WAL with synchronous=NORMAL does not
    fsync), or it fails with SQLITE_BUSY having changed nothing and then waits for the lock
    in a dedicated thread. Checkpoints fsync, so the loop's connection never runs them; every
    CHECKPOINT_EVERY-th write goes through the thread, whose connection checkpoints once the
    WAL has grown past SQLite's default of 1000 pages.
    """

    CHECKPOINT_EVERY = 64

    def __init__(self, url: URL) -> None:
        url = url.set(drivername="sqlite+pysqlite")
        args = {"check_same_thread": False}
        self._inline = sqlalchemy.create_engine(url, connect_args={**args, "timeout": 0})
        event.listen(self._inline, "connect", _sqlite_pragmas)
        event.listen(self._inline, "connect", _never_wait_never_checkpoint)
        self._waiting = sqlalchemy.create_engine(url, connect_args={**args, "timeout": 30})
        event.listen(self._waiting, "connect", _sqlite_pragmas)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._connection: Connection | None = None  # the loop's, kept open: no pool round trip
        self._writes = 0

    @property
    def engines(self) -> list[Engine]:
        return [self._inline, self._waiting]

    async def write(self, statement: Executable, params: dict[str, Any]) -> int:
        self._writes += 1
        if self._writes % self.CHECKPOINT_EVERY:
            if self._connection is None:
                self._connection = self._inline.connect()
            try:
                changed = self._connection.execute(statement, params).rowcount
                self._connection.commit()
                return int(changed)
            except OperationalError as exc:
                self._connection.rollback()
                if getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
            except BaseException:
                self._connection.rollback()
                raise
        # The copied context carries the caller's trace into the thread.
        call = functools.partial(contextvars.copy_context().run, self._wait, statement, params)
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _wait(self, statement: Executable, params: dict[str, Any]) -> int:
        with self._waiting.begin() as connection:
            return int(connection.execute(statement, params).rowcount)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._connection is not None:
            self._connection.close()
        self._inline.dispose()
        self._waiting.dispose()


def _never_wait_never_checkpoint(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def migrate(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations shipped in this package (blocking; not from a running loop)."""
    config = Config()
    config.set_main_option("script_location", "reasoning_agent:migrations")
    config.attributes["url"] = url
    command.upgrade(config, revision)
