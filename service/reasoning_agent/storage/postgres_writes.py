"""Short write transactions on PostgreSQL: one statement each, in autocommit, on asyncpg."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from opentelemetry.trace import SpanKind
from sqlalchemy import Insert
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase

from reasoning_agent.observability import telemetry

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


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement as asyncpg takes it: SQL with $n placeholders, and how to fill them."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        return [
            params[name] if process is None else process(params[name])
            for name, process in zip(self.names, self.processors, strict=True)
        ]


class PostgresWrites:
    """The writes every task makes (its row, then its outcome), one round trip each: a single
    statement in autocommit on a pooled asyncpg connection, where a SQLAlchemy transaction
    takes four (pre-ping, BEGIN, the statement, COMMIT) and more CPU than the SQL itself.

    asyncpg's pool replaces a connection the server closed (a restart, a failover), which is
    what the pre-ping was for. Errors are SQLAlchemy's, as from every other query, and never
    carry the statement's values (a prompt is one of them)."""

    ACQUIRE_TIMEOUT_S = 30.0  # as SQLAlchemy's pool_timeout

    def __init__(self, engine: AsyncEngine, *, pool_size: int) -> None:
        self._dialect: Dialect = engine.dialect
        _, options = engine.dialect.create_connect_args(engine.url)
        self._connect = {k: v for k, v in options.items() if k not in _ADAPTER_OPTIONS}
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._starting = asyncio.Lock()
        self._compiled: dict[tuple[UpdateBase, tuple[str, ...]], _Compiled] = {}

    async def write(self, statement: UpdateBase, params: dict[str, Any]) -> int:
        """Run one statement and commit it; the number of rows it matched."""
        compiled = self._compile(statement, tuple(params))
        arguments = compiled.arguments(params)
        with telemetry.span(compiled.sql.split(None, 1)[0], kind=SpanKind.CLIENT) as span:
            if span.is_recording():
                span.set_attributes({"db.system": "postgresql", "db.statement": compiled.sql})
            try:
                pool = await self._started()
                async with pool.acquire(timeout=self.ACQUIRE_TIMEOUT_S) as connection:
                    status = await connection.execute(compiled.sql, *arguments)
            except TimeoutError as exc:
                raise PoolTimeout(f"no connection within {self.ACQUIRE_TIMEOUT_S} s") from exc
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise IntegrityError(compiled.sql, None, exc) from exc
            except _UNAVAILABLE as exc:
                raise OperationalError(compiled.sql, None, exc) from exc
            except asyncpg.PostgresError as exc:
                raise DatabaseError(compiled.sql, None, exc) from exc
        return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 1", "UPDATE 1"

    async def _started(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._starting:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        min_size=0,
                        max_size=self._pool_size,
                        reset=_nothing_to_reset,
                        **self._connect,
                    )
        return self._pool

    def _compile(self, statement: UpdateBase, names: tuple[str, ...]) -> _Compiled:
        key = (statement, names)
        compiled = self._compiled.get(key)
        if compiled is None:
            # An INSERT without values takes its columns from the parameters.
            keys = list(names) if isinstance(statement, Insert) else None
            sql = statement.compile(dialect=self._dialect, column_keys=keys)
            assert isinstance(sql, SQLCompiler)
            order: Sequence[str] = sql.positiontup or ()
            missing = set(order) - set(names)
            if missing:
                raise ValueError(f"no value for {', '.join(sorted(missing))}")
            processors = tuple(
                sql.binds[name].type.dialect_impl(self._dialect).bind_processor(self._dialect)
                for name in order
            )
            compiled = self._compiled[key] = _Compiled(sql.string, tuple(order), processors)
        return compiled

    async def aclose(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5)
            except TimeoutError:
                self._pool.terminate()


async def _nothing_to_reset(_connection: asyncpg.Connection) -> None:
    """A released connection needs no reset query: these writes change no session state."""
