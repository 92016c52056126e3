"""The in-process event log: what it keeps, for how long, and what it lets go."""

from __future__ import annotations

import asyncio

import pytest

from reasoning_agent.tasks.events import EventLog

pytestmark = pytest.mark.database_agnostic

TTL_S = 0.05


async def _ended(log: EventLog, task_id: str) -> None:
    await log.publish(task_id, "task", {"id": task_id})
    await log.publish(task_id, "done", {"id": task_id})


def test_an_ended_task_is_kept_for_the_ttl_then_let_go() -> None:
    async def run() -> None:
        log = EventLog(ttl_s=TTL_S)
        await _ended(log, "old")
        await log.publish("fresh", "task", {})  # a new task is when the log expires the old
        assert await log.has("old")
        await asyncio.sleep(TTL_S * 2)
        await log.publish("newer", "task", {})
        assert not await log.has("old")
        assert [e async for e in log.follow("old")] == []

    asyncio.run(run())


def test_a_task_that_has_not_ended_is_kept_however_old() -> None:
    async def run() -> None:
        log = EventLog(ttl_s=TTL_S)
        await log.publish("running", "task", {})
        await _ended(log, "finished")
        await asyncio.sleep(TTL_S * 2)
        await log.publish("next", "task", {})
        assert await log.has("running") and not await log.has("finished")

    asyncio.run(run())


def test_only_the_tasks_past_their_ttl_go() -> None:
    async def run() -> None:
        log = EventLog(ttl_s=TTL_S * 4)
        for number in range(50):
            await _ended(log, f"early-{number}")
        await asyncio.sleep(TTL_S * 2)
        for number in range(50):
            await _ended(log, f"late-{number}")
        await asyncio.sleep(TTL_S * 3)  # past the early ones' ttl, not the late ones'
        await log.publish("next", "task", {})
        kept = [await log.has(f"{kind}-{n}") for kind in ("early", "late") for n in range(50)]
        assert kept == [False] * 50 + [True] * 50

    asyncio.run(run())


def test_a_task_that_ends_again_is_kept_from_its_last_end() -> None:
    async def run() -> None:
        log = EventLog(ttl_s=TTL_S * 3)
        await _ended(log, "twice")
        await asyncio.sleep(TTL_S * 2)
        await log.publish("twice", "done", {})  # e.g. a cancelled stream's end after its error
        await asyncio.sleep(TTL_S * 2)  # past the first end's ttl, not the second's
        await log.publish("next", "task", {})
        assert await log.has("twice")
        assert [e.kind async for e in log.follow("twice")] == ["task", "done"]

    asyncio.run(run())
