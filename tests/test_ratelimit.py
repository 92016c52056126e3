"""Per-key limits: in-process by default, exact across workers through Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import StartService
from tests.support import ALICE, BOB, redis_url

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic


def test_the_61st_task_in_a_minute_gets_429_with_retry_after(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock")  # the default RATE_LIMIT, 60/minute
    with service.client(ALICE) as alice, service.client(BOB) as bob:
        for n in range(60):
            response = alice.post("/task", json={"prompt": f"n={n}"})
            assert response.status_code == 200, (n, response.text)
            assert response.headers["X-RateLimit-Remaining"] == str(59 - n)
        refused = alice.post("/task", json={"prompt": "one too many"})
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limited"
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert refused.headers["X-RateLimit-Limit"] == "60"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert int(refused.headers["X-RateLimit-Reset"]) >= int(time.time())

        assert bob.post("/task", json={"prompt": "bob has his own"}).status_code == 200
        assert alice.get("/query").status_code == 200  # reads have their own limit
        stored = alice.get("/query", params={"limit": 100}).json()["items"]
        assert len(stored) == 60  # the refused request stored nothing

        metrics = alice.get("/metrics").text
        assert 'reasoning_agent_rate_limited_total{key="alice",scope="task"} 1.0' in metrics


def test_several_limits_and_the_query_limit(start_service: StartService) -> None:
    service = start_service(
        LLM_PROVIDER="mock", RATE_LIMIT="100/minute;3/hour", QUERY_RATE_LIMIT="2/minute"
    )
    with service.client() as client:
        assert [client.post("/task", json={"prompt": "x"}).status_code for _ in range(4)] == [
            200,
            200,
            200,
            429,
        ]
        assert [client.get("/query").status_code for _ in range(3)] == [200, 200, 429]
        assert client.get("/task/0123").status_code == 429  # GET /task/{id} is a read too


def test_a_limit_shared_by_two_workers_lets_exactly_five_through(
    start_service: StartService,
) -> None:
    service = start_service(
        LLM_PROVIDER="mock", WORKERS="2", REDIS_URL=redis_url(), RATE_LIMIT="5/minute"
    )

    def task_pids() -> Counter[int]:
        lines = [
            json.loads(line) for line in service.logs().splitlines() if '"route": "/task"' in line
        ]
        return Counter(line["pid"] for line in lines)

    async def burst(n: int) -> list[int]:
        # A new connection per request, so the kernel spreads them over both workers.
        async def one(i: int) -> int:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                response = await client.post(
                    "/task", json={"prompt": f"burst {i}"}, headers={"X-API-Key": ALICE}
                )
                return response.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    statuses: list[int] = []
    for _ in range(20):  # bounded: at most 600 requests
        statuses += asyncio.run(burst(30))
        per_worker = task_pids()
        if len(per_worker) == 2 and min(per_worker.values()) > 5:
            break
    # Each worker answered more than 5 requests: separate counters would have let up to 10 pass.
    assert len(per_worker) == 2 and min(per_worker.values()) > 5, per_worker
    assert statuses.count(200) == 5, statuses
    assert statuses.count(429) == len(statuses) - 5
    with service.client() as client:
        assert len(client.get("/query", params={"limit": 100}).json()["items"]) == 5
