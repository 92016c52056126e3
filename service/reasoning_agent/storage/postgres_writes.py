"""Short write transactions on PostgreSQL, straight on asyncpg: one commit per loop turn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import UpdateBase

from reasoning_agent.storage.statements import Compiled, Statements

__all__ = ["PostgresWrites"]

# Options of SQLAlchemy's asyncpg adapter, not of asyncpg.connect.
_ADAPTER_OPTIONS = (
    "async_creator_fn",
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
)
# What a server that is restarting, failing over, full or unreachable raises; a retry may succeed.
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
    OSError,
)


@dataclass(slots=True)
class _Write:
    """One caller's statement, waiting for the commit that makes it durable."""

    compiled: Compiled
    arguments: list[Any]
    done: asyncio.Future[int]

    def settle(self, outcome: int | BaseException) -> None:
        if self.done.done():  # its caller was cancelled meanwhile
            return
        if isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)


class PostgresWrites:
    """The writes every task makes (its row, then its outcome), in as few round trips and
    commits as they can be: the writes of one event-loop turn are committed together, each
    caller answered once that commit is durable; a write alone is one autocommit statement.
    A SQLAlchemy transaction took four round trips per write (pre-ping, BEGIN, the statement,
    COMMIT) and more CPU than the SQL itself, and every commit waits for its own WAL flush.

    asyncpg's pool replaces a connection the server closed (a restart, a failover), which is
    what the pre-ping was for. Errors are SQLAlchemy's, as from every other query, and never
    carry the statement's values (a prompt is one of them)."""

    ACQUIRE_TIMEOUT_S = 30.0  # as SQLAlchemy's pool_timeout

    def __init__(self, engine: AsyncEngine, *, pool_size: int | None) -> None:
        self._statements = Statements(engine.dialect)
        _, options = engine.dialect.create_connect_args(engine.url)
        self._connect = {k: v for k, v in options.items() if k not in _ADAPTER_OPTIONS}
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._starting = asyncio.Lock()
        self._turn: list[_Write] = []  # this loop turn's writes, not yet sent
        self._flushing: set[asyncio.Task[None]] = set()

    async def write(self, statement: UpdateBase, params: dict[str, Any]) -> int:
        """Run one statement and commit it; the number of rows it matched."""
        compiled = self._statements.compiled(statement, tuple(params))
        loop = asyncio.get_running_loop()
        write = _Write(compiled, compiled.arguments(params), loop.create_future())
        self._turn.append(write)
        if len(self._turn) == 1:  # the turn's first: the rest of the turn's join it
            loop.call_soon(self._flush)
        with compiled.span("postgresql"):
            return await write.done

    def _flush(self) -> None:
        writes, self._turn = self._turn, []
        flushing = asyncio.create_task(
            self._commit(writes) if len(writes) > 1 else self._alone(writes[0])
        )
        self._flushing.add(flushing)
        flushing.add_done_callback(self._flushing.discard)

    async def _commit(self, writes: list[_Write]) -> None:
        """The writes in one transaction; if it fails, each alone, so that only the ones the
        database refuses fail, each with its own error."""
        try:
            async with self._connection() as connection, connection.transaction():
                matched = [await connection.execute(w.compiled.sql, *w.arguments) for w in writes]
        except Exception:
            await asyncio.gather(*(self._alone(w) for w in writes))
            return
        except BaseException:
            for w in writes:
                w.done.cancel()
            raise
        for w, status in zip(writes, matched, strict=True):
            w.settle(_rows(status))

    async def _alone(self, write: _Write) -> None:
        sql = write.compiled.sql
        try:
            async with self._connection() as connection:
                status = await connection.execute(sql, *write.arguments)
        except TimeoutError:
            write.settle(PoolTimeout(f"no connection within {self.ACQUIRE_TIMEOUT_S} s"))
        except asyncpg.IntegrityConstraintViolationError as exc:
            write.settle(IntegrityError(sql, None, exc))
        except _UNAVAILABLE as exc:
            write.settle(OperationalError(sql, None, exc))
        except asyncpg.PostgresError as exc:
            write.settle(DatabaseError(sql, None, exc))
        except BaseException:
            write.done.cancel()
            raise
        else:
            write.settle(_rows(status))

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[Any]]:
        """A connection of the pool, which is made on the first write."""
        if self._pool is None:
            async with self._starting:
                if self._pool is None:
                    options = dict(self._connect, min_size=0, reset=_nothing_to_reset)
                    if self._pool_size is not None:
                        options["max_size"] = self._pool_size
                    self._pool = await asyncpg.create_pool(**options)
        async with self._pool.acquire(timeout=self.ACQUIRE_TIMEOUT_S) as connection:
            yield connection

    async def aclose(self) -> None:
        if self._flushing:
            await asyncio.wait(self._flushing, timeout=5)
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5)
            except TimeoutError:
                self._pool.terminate()


def _rows(status: str) -> int:
    """The rows a statement matched, from its status: "INSERT 0 1", "UPDATE 1"."""
    return int(status.rsplit(" ", 1)[-1])


async def _nothing_to_reset(_connection: asyncpg.Connection) -> None:
    """A released connection needs no reset query: these writes change no session state."""
