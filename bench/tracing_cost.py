"""What tracing costs: requests per second with tracing off and on (100% sampled), same machine.

Runs the fake OpenAI upstream (no delay), then `reasoning-agent serve` (1 worker, SQLite, Redis
limits) twice: once with no OTLP endpoint, once exporting every span to a local OTLP/HTTP
receiver. Each is loaded in turn, off/on/off/on, with 16 concurrent connections for `seconds`;
the figures are the medians of the rounds.

    .venv/bin/python bench/tracing_cost.py [seconds-per-round] [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fake_openai import FakeOpenAI  # noqa: E402
from tests.otlp_receiver import OTLPReceiver  # noqa: E402
from tests.support import ALICE, OPENAI_KEY, Service, redis_url  # noqa: E402

CONNECTIONS = 16


async def load(base_url: str, seconds: float) -> tuple[int, int]:
    """Requests completed and failed by CONNECTIONS loops within `seconds`."""
    done = failed = 0
    stop = time.monotonic() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        nonlocal done, failed
        while time.monotonic() < stop:
            response = await client.post("/task", json={"prompt": "how much does tracing cost?"})
            if response.status_code == 200:
                done += 1
            else:
                failed += 1

    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"X-API-Key": ALICE}, limits=limits, timeout=30
    ) as client:
        await asyncio.gather(*(loop(client) for _ in range(CONNECTIONS)))
    return done, failed


def main(seconds: float = 15, rounds: int = 2) -> None:
    upstream = FakeOpenAI().start()
    receiver = OTLPReceiver().start()
    tmp = Path(tempfile.mkdtemp(prefix="ra-tracing-"))
    base = {
        "API_KEYS": f"alice:{ALICE}",
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_MODEL": "fake-model",
        "RATE_LIMIT": "1000000/minute",
        "LOG_LEVEL": "WARNING",
    }
    contenders = {
        "off": {**base, "DATABASE_URL": f"sqlite:///{tmp}/off.db", "REDIS_URL": redis_url(db=12)},
        "on": {
            **base,
            "DATABASE_URL": f"sqlite:///{tmp}/on.db",
            "REDIS_URL": redis_url(db=13),
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_SERVICE_NAME": "reasoning-agent-bench",
        },
    }
    services = {
        name: Service(env, log_path=tmp / f"{name}.log").start() for name, env in contenders.items()
    }
    results: dict[str, list[float]] = {name: [] for name in services}
    try:
        for service in services.values():  # warm up
            asyncio.run(load(service.base_url, 2))
        for round_ in range(rounds):
            for name, service in services.items():
                done, failed = asyncio.run(load(service.base_url, seconds))
                results[name].append(done / seconds)
                print(
                    f"round {round_ + 1} tracing {name:3}: {done / seconds:7.1f} req/s ({failed} failed)"
                )
    finally:
        for service in services.values():
            service.stop()
        upstream.stop()
        receiver.stop()
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"\ntracing off: {off:.1f} req/s   tracing on (100% sampled): {on:.1f} req/s")
    print(f"cost of tracing: {100 * (off - on) / off:.1f}% fewer requests per second")
    print(f"spans received by the OTLP receiver: {len(receiver.spans)}")


if __name__ == "__main__":
    main(*(float(a) if i == 0 else int(a) for i, a in enumerate(sys.argv[1:])))
