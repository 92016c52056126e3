"""Upkeep of the tasks table: freeing the tasks of processes that died, and deleting expired
ones."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from reasoning_agent.storage.db import Database
from reasoning_agent.tasks.leases import LEASE_S
from reasoning_agent.tasks.repository import Swept, TaskRepository
from reasoning_agent.tasks.service import TaskService

__all__ = ["SWEEP_S", "purge", "purge_forever", "sweep", "sweep_forever"]

log = logging.getLogger(__name__)

SWEEP_S = LEASE_S  # a dead process's tasks are freed within two leases
_LOCK = 74_201_002  # one replica at a time on PostgreSQL
_BATCH = 500
_PAUSE_S = 0.05  # between batches, so requests get the database in between


async def sweep(tasks: TaskService) -> Swept:
    """Fail or queue again what dead processes held, and give lost jobs back to the runner."""
    swept = await tasks.sweep()
    if swept.failed or swept.requeued or swept.resubmitted:
        log.warning(
            "swept the tasks of stopped processes",
            extra={
                "failed": swept.failed,
                "requeued": swept.requeued,
                "resubmitted": swept.resubmitted,
            },
        )
    return swept


async def sweep_forever(tasks: TaskService) -> None:
    """Sweep every SWEEP_S (`serve` sweeps once before its workers start)."""
    while True:
        await asyncio.sleep(SWEEP_S)
        try:
            await sweep(tasks)
        except Exception as exc:
            log.error("sweep failed: %s", exc.__class__.__name__)


async def purge(database: Database, *, older_than: timedelta, batch: int = _BATCH) -> int | None:
    """Delete tasks older than RETENTION_DAYS batch by batch; None when another process holds
    the purge."""
    engine = database.engine
    repository = TaskRepository(database)
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
                gone = await repository.delete_older_than(cutoff, batch=batch)
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


async def purge_forever(database: Database, *, days: float, interval_s: float) -> None:
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
