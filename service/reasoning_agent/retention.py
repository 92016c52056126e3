"""Deleting tasks older than RETENTION_DAYS, in small batches, without holding up requests."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from reasoning_agent import tasks
from reasoning_agent.db import Database

__all__ = ["purge", "run_forever"]

log = logging.getLogger(__name__)

_LOCK = 74_201_002  # one replica at a time on PostgreSQL
_BATCH = 500
_PAUSE_S = 0.05  # between batches, so requests get the database in between


async def purge(database: Database, *, older_than: timedelta, batch: int = _BATCH) -> int | None:
    """Delete expired tasks batch by batch; None when another process holds the purge."""
    engine = database.engine
    postgres = engine.dialect.name == "postgresql"
    async with engine.connect() as lock:
        if postgres:
            got = (await lock.execute(text(f"SELECT pg_try_advisory_lock({_LOCK})"))).scalar()
            await lock.commit()
            if not got:
                return None
        try:
            cutoff = datetime.now(UTC) - older_than
            deleted = 0
            while True:
                async with database.sessions() as session:
                    gone = await tasks.delete_older_than(session, cutoff, batch=batch)
                deleted += gone
                if gone < batch:
                    break
                await asyncio.sleep(_PAUSE_S)
            if deleted:
                await _tidy(engine)
            return deleted
        finally:
            if postgres:
                await lock.execute(text(f"SELECT pg_advisory_unlock({_LOCK})"))
                await lock.commit()


async def _tidy(engine: AsyncEngine) -> None:
    """Give the space and the statistics back: VACUUM (non-blocking) on PostgreSQL, and on
    SQLite only `PRAGMA optimize` (its VACUUM would lock out every writer; freed pages are reused)."""
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("VACUUM (ANALYZE) tasks"))
        else:
            await connection.execute(text("PRAGMA optimize"))


async def run_forever(database: Database, *, days: float, interval_s: float) -> None:
    """Purge now (after a short random delay, so workers spread out) and every `interval_s`."""
    await asyncio.sleep(random.uniform(0, min(5.0, interval_s)))
    while True:
        try:
            deleted = await purge(database, older_than=timedelta(days=days))
            if deleted:
                log.info("retention deleted old tasks", extra={"deleted": deleted, "days": days})
        except Exception as exc:
            log.error("retention failed: %s", exc.__class__.__name__)
        await asyncio.sleep(interval_s)
