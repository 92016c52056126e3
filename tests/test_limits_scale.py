"""Limits across processes and replicas, and what happens when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from limits import parse_many
from redis.asyncio import Redis

from reasoning_agent.ratelimit import Decision, LocalLimiter, RateLimiter, StoreUnavailable
from tests.conftest import StartService
from tests.support import ALICE, BOB, free_port, need, redis_url

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic

CAROL = "carol-key-0123456789abcdef"


def test_exact_across_two_processes_of_two_workers(start_service: StartService) -> None:
    """Two `serve` processes (think: two replicas) x 2 workers share one limit through Redis."""
    shared = redis_url()
    env = {
        "API_KEYS": f"alice:{ALICE},bob:{BOB},carol:{CAROL}",
        "LLM_PROVIDER": "mock",
        "WORKERS": "2",
        "REDIS_URL": shared,
        "RATE_LIMIT": "60/minute",
    }
    first = start_service(**env)
    second = start_service(**env)
    bases = [first.base_url, second.base_url]

    async def flood(key: str) -> list[int]:
        async def one(i: int) -> int:
            async with httpx.AsyncClient(base_url=bases[i % 2], timeout=60) as client:
                response = await client.post(
                    "/task", json={"prompt": f"replica {i}"}, headers={"X-API-Key": key}
                )
                return response.status_code

        return list(await asyncio.gather(*(one(i) for i in range(200))))

    accuracy = []
    for key in (ALICE, BOB, CAROL):  # three runs, one key each
        statuses = asyncio.run(flood(key))
        assert statuses.count(200) == 60 and statuses.count(429) == 140, statuses
        accuracy.append(f"{statuses.count(200)}/60")
    pids = {
        json.loads(line)["pid"]
        for service in (first, second)
        for line in service.logs().splitlines()
        if '"route": "/task"' in line
    }
    assert len(pids) >= 3, f"requests reached only workers {pids}"
    print(f"\nlimit accuracy (accepted/expected), 3 runs: {', '.join(accuracy)}")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict]:
    """A redis-server of our own on a free port, which the test may stop and start."""
    binary = shutil.which("redis-server")
    if binary is None:
        need("redis-server", "127.0.0.1", 0)  # skips on a laptop, fails in CI
    port = free_port()
    handle: dict = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "process": None}

    def start() -> None:
        handle["process"] = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop() -> None:
        handle["process"].terminate()
        handle["process"].wait(timeout=10)

    handle["start"], handle["stop"] = start, stop
    start()
    yield handle
    if handle["process"].poll() is None:
        stop()


def test_redis_stops_and_returns_mid_test(start_service: StartService, own_redis: dict) -> None:
    service = start_service(LLM_PROVIDER="mock", REDIS_URL=own_redis["url"], RATE_LIMIT="4/minute")
    with service.client() as client:
        assert [client.post("/task", json={"prompt": "a"}).status_code for _ in range(2)] == [
            200,
            200,
        ]
        own_redis["stop"]()

        # Redis is gone: each process limits in memory with a fresh window of its share.
        statuses = [client.post("/task", json={"prompt": "b"}).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 200, 429]
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["checks"]["redis"] == "fail"
        assert client.get("/livez").status_code == 200
        metrics = client.get("/metrics").text
        assert 'reasoning_agent_rate_limit_store_errors_total{mode="local"} 5.0' in metrics

        own_redis["start"]()  # an empty Redis comes back on the same port
        time.sleep(1.2)  # the limiter asks a failed store again after a second
        statuses = [client.post("/task", json={"prompt": "c"}).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 200, 429]  # Redis's fresh window of 4, not memory's
        assert client.get("/healthz").json()["status"] == "ok"
        keys = subprocess.run(
            ["redis-cli", "-p", str(own_redis["port"]), "--scan"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert keys == ["ra:{task:alice}:4/60"]
    logs = service.logs()
    assert logs.count("rate-limit store unreachable") == 1  # once per incident
    assert logs.count("rate-limit store reachable again") == 1


@pytest.mark.parametrize(("mode", "expected"), [("allow", [200] * 4), ("deny", [503] * 4)])
def test_the_store_error_policy(
    start_service: StartService, mode: str, expected: list[int]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    service = start_service(
        LLM_PROVIDER="mock", REDIS_URL=dead, RATE_LIMIT="2/minute", RATE_LIMIT_ON_STORE_ERROR=mode
    )
    with service.client() as client:
        responses = [client.post("/task", json={"prompt": "x"}) for _ in range(4)]
        assert [r.status_code for r in responses] == expected
        if mode == "deny":
            assert responses[0].json()["error"]["type"] == "unavailable"
            assert client.get("/query").status_code == 503
        metrics = client.get("/metrics").text if mode == "allow" else ""
        assert mode == "deny" or f'rate_limit_store_errors_total{{mode="{mode}"}} 4.0' in metrics
        assert client.get("/livez").status_code == 200


def test_the_sliding_window_is_exact_in_redis_and_in_memory() -> None:
    items = parse_many("3/second")

    async def in_redis() -> list[bool]:
        limiter = RateLimiter(redis_url=redis_url())
        try:
            first = [(await limiter.hit("t", "sliding", items)).allowed for _ in range(4)]
            await asyncio.sleep(1.05)
            return [*first, (await limiter.hit("t", "sliding", items)).allowed]
        finally:
            await limiter.aclose()

    assert asyncio.run(in_redis()) == [True, True, True, False, True]

    local = LocalLimiter()
    decisions = [local.hit("t", "o", items) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].retry_after == 1 and decisions[0].retry_after == 0
    shared_by_two = LocalLimiter(share=2)  # each of 2 workers enforces half
    assert [shared_by_two.hit("t", "o", parse_many("4/minute")).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]


def test_checks_made_at_once_share_pipelines_and_stay_exact(own_redis: dict) -> None:
    """200 checks at once from one worker: exactly the limit passes, and they reach Redis in
    pipelines of up to 32, a few reads on its side rather than one per check."""
    items = parse_many("50/minute")

    async def at_once() -> tuple[list[Decision], int]:
        limiter = RateLimiter(redis_url=own_redis["url"])
        admin = Redis.from_url(own_redis["url"])
        try:
            await limiter.hit("t", "warm", items)  # connect and load the script first
            before = (await admin.info("stats"))["total_reads_processed"]
            decisions = await asyncio.gather(
                *(limiter.hit("t", "owner", items) for _ in range(200))
            )
            reads = (await admin.info("stats"))["total_reads_processed"] - before - 1
            return list(decisions), reads
        finally:
            await limiter.aclose()
            await admin.aclose()

    decisions, reads = asyncio.run(at_once())
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 50
    assert sorted(d.remaining for d in allowed) == list(range(50))
    assert all(d.retry_after >= 1 for d in decisions if not d.allowed)
    assert 0 < reads <= 2 * math.ceil(200 / 32), reads


def test_a_flushed_script_cache_is_loaded_again() -> None:
    """A restarted Redis has forgotten the script: it is loaded again and nothing is counted
    twice."""
    url = redis_url()
    items = parse_many("10/minute")

    async def around_a_flush() -> list[int]:
        limiter = RateLimiter(redis_url=url, on_store_error="deny")
        admin = Redis.from_url(url)
        try:
            first = await limiter.hit("t", "flushed", items)
            await admin.script_flush()
            after = await asyncio.gather(*(limiter.hit("t", "flushed", items) for _ in range(3)))
            return [first.remaining, *(d.remaining for d in after)]
        finally:
            await limiter.aclose()
            await admin.aclose()

    assert sorted(asyncio.run(around_a_flush())) == [6, 7, 8, 9]


def test_a_batch_that_cannot_reach_redis_fails_every_check_in_it() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"

    async def at_once() -> list[BaseException | Decision]:
        limiter = RateLimiter(redis_url=dead, on_store_error="deny")
        try:
            items = parse_many("5/minute")
            return list(
                await asyncio.gather(
                    *(limiter.hit("t", "o", items) for _ in range(40)), return_exceptions=True
                )
            )
        finally:
            await limiter.aclose()

    outcomes = asyncio.run(at_once())
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
