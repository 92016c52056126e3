"""Storage under real processes: restarts keep every task; concurrent writers lose none."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI, Step
from tests.support import ALICE, query, redis_url


def test_a_restart_keeps_every_task(
    start_service: StartService, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    service = start_service()
    with service.client() as client:
        ok = [client.post("/task", json={"prompt": f"keep {i}"}).json() for i in range(3)]
        fake_llm.script(Step(status=400))
        failed = client.post("/task", json={"prompt": "keep the failure too"}).json()
    service.restart()
    with service.client() as client:
        items = client.get("/query", params={"limit": 100}).json()["items"]
        assert [t["id"] for t in items] == [failed["error"]["task_id"]] + [
            t["id"] for t in reversed(ok)
        ]
        assert items[1:] == list(reversed(ok))
        assert items[0]["status"] == "failed"


def test_200_concurrent_tasks_over_two_workers_store_200_rows(
    start_service: StartService, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    fake_llm.default_delay = 0.05
    service = start_service(WORKERS="2", REDIS_URL=redis_url(), RATE_LIMIT="1000/minute")

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=service.base_url, headers={"X-API-Key": ALICE}, timeout=60, limits=limits
        ) as client:
            return await asyncio.gather(
                *(client.post("/task", json={"prompt": f"flood {i}"}) for i in range(200))
            )

    responses = asyncio.run(flood())
    assert [r.status_code for r in responses] == [200] * 200
    assert len({r.json()["id"] for r in responses}) == 200
    assert fake_llm.calls == 200
    rows = query(
        service.env["DATABASE_URL"],
        "SELECT count(*), count(DISTINCT prompt) FROM tasks WHERE status = 'completed'",
    )
    assert rows == [(200, 200)]
    assert "database is locked" not in service.logs()
