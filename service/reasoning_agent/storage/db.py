"""The database (SQLite or PostgreSQL): its engine, sessions, fast writes, and migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.sql.dml import UpdateBase

from reasoning_agent.storage.postgres_writes import PostgresWrites
from reasoning_agent.storage.sqlite_writes import SQLiteWrites, sqlite_pragmas

__all__ = [
    "Database",
    "async_url",
    "create_engine",
    "display_url",
    "migrate",
    "ping",
]


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


def create_engine(url: str, *, pool_size: int | None = None, **options: Any) -> AsyncEngine:
    """An engine; SQLite gets WAL and a busy timeout so several workers can write at once.
    PostgreSQL keeps up to `pool_size` connections open, so a busy worker does not connect
    and disconnect for each request past the pool."""
    target = async_url(url)
    if target.get_backend_name() != "sqlite":
        if pool_size is not None:
            options |= {"pool_size": pool_size, "max_overflow": 0}
        return create_async_engine(target, pool_pre_ping=True, **options)
    if target.database and target.database != ":memory:":
        Path(target.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(target, connect_args={"timeout": 30}, **options)
    event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    return engine


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


class Database:
    """The engine and its sessions for everything, plus `write()` for the short write
    transactions every task makes, taken the cheapest way the database allows. On
    PostgreSQL a worker keeps up to `pool_size` connections for those writes and as many
    for everything else (without `pool_size`, each library's own default)."""

    def __init__(self, url: str, *, pool_size: int | None = None) -> None:
        self.engine = create_engine(url, pool_size=pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        sqlite = self.engine.dialect.name == "sqlite"
        self._sqlite = SQLiteWrites(self.engine.url) if sqlite else None
        self._postgres = None if sqlite else PostgresWrites(self.engine, pool_size=pool_size)

    @property
    def engines(self) -> list[Engine]:
        """Every sync engine underneath, for instrumentation."""
        return [self.engine.sync_engine, *(self._sqlite.engines if self._sqlite else [])]

    async def write(self, statement: UpdateBase, params: dict[str, Any]) -> int:
        """Run one statement and commit it (on PostgreSQL, with the others of this loop turn);
        the number of rows it matched."""
        if self._sqlite is not None:
            return await self._sqlite.write(statement, params)
        assert self._postgres is not None
        return await self._postgres.write(statement, params)

    async def aclose(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._postgres is not None:
            await self._postgres.aclose()
        await self.engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations shipped in this package (blocking; not from a running loop)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "reasoning_agent:migrations")
    config.attributes["url"] = url
    command.upgrade(config, revision)
