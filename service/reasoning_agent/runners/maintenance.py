"""Upkeep of the tasks table: failing tasks whose process died, and deleting expired ones."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from reasoning_agent.runners.arq import MAX_TRIES
from reasoning_agent.storage.db import Database
from reasoning_agent.tasks.repository import TaskRepository

__all__ = ["horizons", "purge", "purge_forever", "sweep", "sweep_forever"]

log = logging.getLogger(__name__)

_LOCK = 74_201_002  # one replica at a time on PostgreSQL
_BATCH = 500
_PAUSE_S = 0.05  # between batches, so requests get the database in between


def horizons(deadline_s: float, *, arq: bool) -> dict[str, timedelta]:
    """How long a `pending` and a `running` task may live before its process must be dead.
    A request or an in-process job ends by the deadline; an arq job may be handed out again
    (its claim lasts job_timeout + 10 s) up to MAX_TRIES times."""
    request = timedelta(seconds=deadline_s + 5)
    retries = timedelta(seconds=MAX_TRIES * (deadline_s + 5 + 10) + 15)
    return {"pending_after": request, "running_after": retries if arq else request}


async def sweep(repository: TaskRepository, *, deadline_s: float, arq: bool) -> int:
    """Fail tasks left `pending` or `running` by a process that died; how many."""
    failed = await repository.fail_interrupted(**horizons(deadline_s, arq=arq))
    if failed:
        log.warning("marked interrupted tasks as failed", extra={"failed": failed})
    return failed


async def sweep_forever(repository: TaskRepository, *, deadline_s: float, arq: bool) -> None:
    """Sweep once a minute, or once a deadline when that is shorter."""
    while True:
        await asyncio.sleep(min(60.0, deadline_s))
        try:
            await sweep(repository, deadline_s=deadline_s, arq=arq)
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
