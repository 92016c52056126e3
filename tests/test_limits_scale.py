"""Limits across processes and replicas, and what happens when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from limits import parse_many
from redis.asyncio import Redis

from reasoning_agent.ratelimit import (
    Decision,
    LocalLimiter,
    RateLimiter,
    StoreUnavailable,
    TokenAsk,
)
from reasoning_agent.windows import token_windows
from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI
from tests.support import ALICE, BOB, free_port, need, redis_url, worker_pids

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


def test_a_token_budget_admits_exactly_its_reservations_across_two_processes_of_two_workers(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    """50 calls at once against a budget with room for 10 reservations: each check reserves in
    the same atomic step, so exactly 10 get through, and the budget is never overspent."""
    shared = redis_url()
    rounds = ["round-1", "round-2", "round-3"]
    keys = {name: f"{name}-key-0123456789abcdef" for name in rounds}
    env = {
        "API_KEYS": ",".join(f"{name}:{key}" for name, key in keys.items()) + f",alice:{ALICE}",
        "ADMIN_KEYS": "alice",
        "WORKERS": "2",
        "REDIS_URL": shared,
        "RATE_LIMIT": "1000/minute",
        "QUERY_RATE_LIMIT": "100000/minute",
        "TOKEN_BUDGET": "1000/day",  # room for 10 reservations of 100
    }
    first = start_service(**env)
    second = start_service(**env)
    bases = [first.base_url, second.base_url]
    fake_llm.default_delay = 2.0  # every admitted call is still running when the last is decided

    async def flood(key: str) -> list[httpx.Response]:
        async def one(i: int) -> httpx.Response:
            async with httpx.AsyncClient(base_url=bases[i % 2], timeout=60) as client:
                return await client.post(
                    "/task",
                    json={"prompt": f"call {i:02d} ".ljust(30, "x"), "max_tokens": 90},
                    headers={"X-API-Key": key},
                )

        return list(await asyncio.gather(*(one(i) for i in range(50))))

    def watch(name: str, stop: threading.Event, seen: list[int]) -> None:
        with httpx.Client(base_url=bases[1], headers={"X-API-Key": ALICE}) as admin:
            while not stop.is_set():
                (window,) = admin.get("/usage", params={"key": name}).json()["windows"]
                seen.append(window["used"] + window["reserved"])
                time.sleep(0.02)

    figures = []
    for name in rounds:
        seen: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(name, stop, seen))
        watcher.start()
        try:
            answers = asyncio.run(flood(keys[name]))
        finally:
            stop.set()
            watcher.join()
        statuses = [answer.status_code for answer in answers]
        assert statuses.count(200) == 10 and statuses.count(429) == 40, statuses
        refused = {a.json()["error"]["type"] for a in answers if a.status_code == 429}
        assert refused == {"token_budget_exceeded"}
        assert seen and max(seen) <= 1000, max(seen)
        with httpx.Client(base_url=bases[0], headers={"X-API-Key": ALICE}) as admin:
            (window,) = admin.get("/usage", params={"key": name}).json()["windows"]
        reported = sum(a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200)
        assert (window["used"], window["reserved"]) == (reported, 0)
        figures.append(f"{statuses.count(200)}/10 admitted, peak {max(seen)}/1000")
    pids = worker_pids(first) | worker_pids(second)
    assert len(pids) >= 3, f"requests reached only workers {pids}"
    print(f"\ntoken budget, 50 at once, 3 rounds: {'; '.join(figures)}")


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


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_tokens_are_reserved_with_their_request_or_not_at_all_and_settle_once(store: str) -> None:
    windows = token_windows([], parse_many("300/day"))
    requests = parse_many("1000/minute")

    def ask(name: str, tokens: int) -> TokenAsk:
        return TokenAsk(id=name, tokens=tokens, windows=windows)

    async def scenario() -> None:
        limiter = RateLimiter(redis_url=redis_url() if store == "redis" else None)
        try:
            admitted = [
                (await limiter.admit("task", "o", requests, ask(n, t))).allowed
                for n, t in (("a", 100), ("b", 150), ("c", 100))
            ]
            assert admitted == [True, True, False]  # 250 held: no room for 100 more
            (state,) = await limiter.usage("o", windows)
            assert (state.used, state.reserved, state.remaining) == (0, 250, 50)
            assert await limiter.settle("o", "a", charge=20) == 100
            assert await limiter.settle("o", "a", charge=20) is None  # a second time: nothing
            assert await limiter.settle("o", "never-made", charge=5) is None
            (state,) = await limiter.usage("o", windows)
            assert (state.used, state.reserved) == (20, 150)
            # An upstream that used more than was reserved is charged it all.
            assert await limiter.settle("o", "b", charge=400) == 150
            (state,) = await limiter.usage("o", windows)
            assert (state.used, state.reserved, state.remaining) == (420, 0, 0)
            refused = await limiter.admit("task", "o", requests, ask("d", 1))
            assert refused.tokens is not None and not refused.allowed
            assert refused.tokens.retry_after is not None

            # A request limit that refuses reserves nothing, and a token window that refuses
            # counts no request.
            one = parse_many("1/minute")
            assert (await limiter.admit("task", "p", one, ask("e", 10))).allowed
            full = await limiter.admit("task", "p", one, ask("f", 10))
            assert not full.requests.allowed and full.reserved is None
            (state,) = await limiter.usage("p", windows)
            assert state.reserved == 10
            tight = token_windows([], parse_many("5/day"))
            no_room = await limiter.admit(
                "task", "q", one, TokenAsk(id="g", tokens=9, windows=tight)
            )
            assert no_room.requests.allowed and not no_room.allowed
            assert no_room.tokens is not None and no_room.tokens.retry_after is None  # never fits
            assert (await limiter.admit("task", "q", one)).allowed  # its request was not counted
        finally:
            await limiter.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_a_new_window_starts_empty_and_an_old_reservation_settles_only_in_its_own(
    store: str,
) -> None:
    windows = token_windows(parse_many("10/second"), [])
    requests = parse_many("1000/minute")

    async def scenario() -> None:
        limiter = RateLimiter(redis_url=redis_url() if store == "redis" else None)
        try:
            await asyncio.sleep(1 - time.time() % 1 + 0.05)  # early in a second
            first = await limiter.admit(
                "task", "o", requests, TokenAsk(id="a", tokens=8, windows=windows)
            )
            assert first.allowed
            second = await limiter.admit(
                "task", "o", requests, TokenAsk(id="b", tokens=8, windows=windows)
            )
            assert not second.allowed and second.tokens is not None
            assert second.tokens.retry_after == 1
            await asyncio.sleep(1 - time.time() % 1 + 0.05)  # the next second: a new window
            third = await limiter.admit(
                "task", "o", requests, TokenAsk(id="c", tokens=8, windows=windows)
            )
            assert third.allowed
            assert await limiter.settle("o", "a", charge=3) == 8  # its window is over
            (state,) = await limiter.usage("o", windows)
            assert (state.used, state.reserved) == (0, 8)  # only c's, in the new window
        finally:
            await limiter.aclose()

    asyncio.run(scenario())


def test_with_redis_away_tasks_are_limited_locally_and_usage_is_a_clear_503(
    start_service: StartService, own_redis: dict
) -> None:
    service = start_service(REDIS_URL=own_redis["url"], TOKEN_BUDGET="5000/day")
    body = {"prompt": "x" * 30, "max_tokens": 90}
    with service.client() as client:
        assert client.post("/task", json=body).status_code == 200
        own_redis["stop"]()
        assert client.post("/task", json=body).json()["reserved_tokens"] == 100  # held here
        away = client.get("/usage")
        assert away.status_code == 503, away.text
        assert away.json()["error"]["type"] == "unavailable"
        own_redis["start"]()  # empty: this Redis keeps nothing on disk
        back = client.get("/usage")
        assert back.status_code == 200
        assert back.json()["windows"][0]["limit"] == 5000


@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
def test_token_limits_follow_the_store_error_policy(mode: str) -> None:
    windows = token_windows([], parse_many("300/day"))
    requests = parse_many("1000/minute")

    async def scenario() -> None:
        dead = f"redis://127.0.0.1:{free_port()}/0"
        limiter = RateLimiter(redis_url=dead, on_store_error=mode)  # type: ignore[arg-type]
        try:
            ask = TokenAsk(id="a", tokens=200, windows=windows)
            if mode == "deny":
                with pytest.raises(StoreUnavailable):
                    await limiter.admit("task", "o", requests, ask)
                return
            admitted = await limiter.admit("task", "o", requests, ask)
            assert admitted.allowed
            again = await limiter.admit(
                "task", "o", requests, TokenAsk(id="b", tokens=200, windows=windows)
            )
            if mode == "allow":  # nothing is reserved, nothing refused
                assert admitted.reserved is None and again.allowed
                assert await limiter.settle("o", "a", charge=5) is None
            else:  # this process keeps the budget itself, and settles what it reserved
                assert admitted.reserved == 200 and not again.allowed
                assert await limiter.settle("o", "a", charge=5) == 200
        finally:
            await limiter.aclose()

    asyncio.run(scenario())


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
