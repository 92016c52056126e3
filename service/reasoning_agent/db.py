"""The async engine for SQLite or PostgreSQL, and the migrations that shape it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, event, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = ["async_url", "create_engine", "display_url", "migrate", "ping", "session_factory"]

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

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def migrate(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations shipped in this package (blocking; not from a running loop)."""
    config = Config()
    config.set_main_option("script_location", "reasoning_agent:migrations")
    config.attributes["url"] = url
    command.upgrade(config, revision)
