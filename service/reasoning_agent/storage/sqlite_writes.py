"""Short write transactions on SQLite, committed on the event loop without waiting there."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sqlite3
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import sqlalchemy
from sqlalchemy import URL, Engine, PoolProxiedConnection, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import UpdateBase

from reasoning_agent.storage.statements import Statements

__all__ = ["SQLiteWrites", "sqlite_pragmas"]

log = logging.getLogger(__name__)

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=30000",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA journal_size_limit={64 * 2**20}",  # a WAL that starts over is cut to 64 MiB
)


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout on every connection, so several workers can write at once."""
    cursor = dbapi_connection.cursor()
    for pragma in _SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


class SQLiteWrites:
    """Short write transactions on SQLite without aiosqlite's two thread hand-offs per DBAPI
    call or SQLAlchemy's execution path (each costs more CPU than the SQL itself): statements
    compiled once, run on the driver's connection; errors are SQLAlchemy's, without the values.

    A write runs right here on the event loop with busy_timeout=0: it takes the write lock at
    once and commits without an fsync (WAL with synchronous=NORMAL), or
    it fails with SQLITE_BUSY having changed nothing. Then, as SQLite's own busy handler would,
    it sleeps and tries again, but asleep in asyncio rather than blocking the loop; a lock held
    past the last pause (another process in a long transaction) is waited for in a dedicated
    thread. Checkpoints fsync, so the loop's connection never runs them: every
    CHECKPOINT_EVERY writes, one runs in the thread. Should one still run CHECKPOINT_LAG writes
    later (a disk slow to sync), further writes wait for it, asleep in asyncio: else the WAL
    would grow for as long as the disk stayed slow.
    """

    # Rarer checkpoints copy more at once; each holds writers back for a moment at its end.
    CHECKPOINT_EVERY = 1000
    # Far more writes than a healthy disk lets through while one checkpoint syncs.
    CHECKPOINT_LAG = 250
    RETRY_PAUSES_S = (0.0005, 0.001, 0.002, 0.004, 0.008)

    def __init__(self, url: URL) -> None:
        url = url.set(drivername="sqlite+pysqlite")
        args = {"check_same_thread": False}
        self._inline = sqlalchemy.create_engine(url, connect_args={**args, "timeout": 0})
        event.listen(self._inline, "connect", sqlite_pragmas)
        event.listen(self._inline, "connect", _never_wait_never_checkpoint)
        self._waiting = sqlalchemy.create_engine(url, connect_args={**args, "timeout": 30})
        event.listen(self._waiting, "connect", sqlite_pragmas)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._statements = Statements(self._inline.dialect)
        # The loop's connection, kept checked out: no pool round trip.
        self._checked_out: PoolProxiedConnection | None = None
        self._connection: sqlite3.Connection | None = None
        self._writes = 0
        self._checkpoint: Future[None] | None = None
        self._checkpoint_began = 0  # at which write

    @property
    def engines(self) -> list[Engine]:
        return [self._inline, self._waiting]

    async def write(self, statement: UpdateBase, params: dict[str, Any]) -> int:
        compiled = self._statements.compiled(statement, tuple(params))
        arguments = compiled.arguments(params)
        with compiled.span("sqlite"):
            return await self._write(compiled.sql, arguments)

    async def _write(self, sql: str, arguments: list[Any]) -> int:
        self._writes += 1
        if self._writes % self.CHECKPOINT_EVERY == 0:
            self._checkpoint_soon()
        elif self._checkpoint_lags():
            assert self._checkpoint is not None
            # asyncio.wait: a failed checkpoint is logged, not raised into this write.
            await asyncio.wait([asyncio.wrap_future(self._checkpoint)])
        changed = self._try_inline(sql, arguments)
        for pause in self.RETRY_PAUSES_S:
            if changed is not None:
                return changed
            await asyncio.sleep(pause)
            changed = self._try_inline(sql, arguments)
        if changed is not None:
            return changed
        # The copied context carries the caller's trace into the thread.
        call = functools.partial(contextvars.copy_context().run, self._wait, sql, arguments)
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _try_inline(self, sql: str, arguments: list[Any]) -> int | None:
        """Rows matched, or None if another connection holds the write lock."""
        if self._connection is None:
            self._checked_out = self._inline.raw_connection()
            self._connection = cast(sqlite3.Connection, self._checked_out.driver_connection)
        try:
            return _committed(self._connection, sql, arguments)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                # The traceback's frames and the error hold each other: a cycle for the
                # collector, made whenever two workers write at once, unless cleared.
                traceback.clear_frames(exc.__traceback__)
                return None
            raise _translated(sql, exc) from None
        except sqlite3.Error as exc:
            raise _translated(sql, exc) from None

    def _wait(self, sql: str, arguments: list[Any]) -> int:
        connection = self._waiting.raw_connection()
        try:
            return _committed(connection, sql, arguments)
        except sqlite3.Error as exc:
            raise _translated(sql, exc) from None
        finally:
            connection.close()  # back to the pool

    def _checkpoint_soon(self) -> None:
        # The thread's own future: an asyncio one is marked done only when the loop next
        # turns, and a run of writes that never waits does not turn it.
        if self._checkpoint is None or self._checkpoint.done():
            self._checkpoint = self._thread.submit(self._run_checkpoint)
            self._checkpoint.add_done_callback(_log_checkpoint_failure)
            self._checkpoint_began = self._writes

    def _checkpoint_lags(self) -> bool:
        return (
            self._writes - self._checkpoint_began > self.CHECKPOINT_LAG
            and self._checkpoint is not None
            and not self._checkpoint.done()
        )

    def _run_checkpoint(self) -> None:
        with self._waiting.connect() as connection:
            # PASSIVE copies the WAL and fsyncs while writers go on; RESTART, with only the
            # last frames left to copy, then lets the WAL start over, which a steady stream of
            # writes never would. Not TRUNCATE: cutting the file holds writers back longer,
            # and journal_size_limit trims it anyway. RESTART gives up behind another
            # process's long transaction.
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
            connection.exec_driver_sql("PRAGMA busy_timeout=200")
            try:
                busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)").one()
            finally:
                connection.exec_driver_sql("PRAGMA busy_timeout=30000")
        if busy:
            log.info("SQLite checkpoint deferred: another connection was busy")

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._checked_out is not None:
            self._checked_out.close()
        self._inline.dispose()
        self._waiting.dispose()


def _committed(connection: Any, sql: str, arguments: list[Any]) -> int:
    """Run one statement on a sqlite3 connection (or the pool's proxy of one) and commit it;
    rolled back if anything fails. The rows it matched."""
    try:
        changed = connection.execute(sql, arguments).rowcount
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    return int(changed)


def _translated(sql: str, exc: sqlite3.Error) -> DBAPIError:
    """SQLAlchemy's error for the driver's, as every other query raises, without the values
    (a prompt is one of them)."""
    return cast(DBAPIError, DBAPIError.instance(sql, None, exc, sqlite3.Error))


def _log_checkpoint_failure(done: Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("SQLite checkpoint failed: %s", done.exception().__class__.__name__)


def _never_wait_never_checkpoint(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")
