"""CPU per request with no server and no load generator: the ASGI app called in-process.

The numbers are steadier than wrk's on a shared 2-core machine (same run twice: within ~3%),
so this is the tool for telling whether a change to the hot path helped. The upstream is
bench/upstream.py on loopback, Redis the local one, SQLite a fresh file.

    .venv/bin/python bench/inprocess.py [service|pass-through] [--requests 3000]
        [--concurrency 1] [--profile out.prof]   # then: python -m pstats out.prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import service_env, start_upstream
from tests.support import ALICE

BODY = json.dumps({"prompt": "What is the capital of France?"}).encode()


def build(which: str, tmp: Path, upstream: str) -> tuple[object, list[tuple[bytes, bytes]]]:
    """The app and the headers a request to it carries."""
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(BODY)).encode()))
    if which == "pass-through":
        os.environ["OPENAI_BASE_URL"] = f"{upstream}/v1"
        from passthrough import app

        return app, headers
    os.environ.update(service_env(tmp / "service.db", upstream))
    cli = Path(sys.executable).parent / "reasoning-agent"
    subprocess.run([str(cli), "migrate"], check=True, capture_output=True)
    from reasoning_agent.app import create_app

    app = create_app()
    log_file = (tmp / "service.log").open("w")
    for handler in logging.getLogger().handlers:  # a file, as under gunicorn, not the terminal
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_file)
    return app, [*headers, (b"x-api-key", ALICE.encode())]


async def one(app: object, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/task",
        "raw_path": b"/task",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)  # type: ignore[operator]
    assert statuses == [200], statuses


@contextlib.asynccontextmanager
async def lifespan(app: object) -> AsyncIterator[None]:
    router = getattr(app, "router", None)
    if router is None or router.lifespan_context is None:
        yield
        return
    async with router.lifespan_context(app):
        yield


async def measure(
    app: object, headers: list, requests: int, concurrency: int, profile: str | None
) -> None:
    async with lifespan(app):
        for _ in range(200):
            await one(app, headers)
        latencies: list[float] = []

        async def client() -> None:
            for _ in range(requests // concurrency):
                started = time.perf_counter()
                await one(app, headers)
                latencies.append((time.perf_counter() - started) * 1000)

        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        cpu = time.process_time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
    latencies.sort()
    print(
        f"{1000 * cpu / len(latencies):.3f} ms CPU per request "
        f"(latency p50 {latencies[len(latencies) // 2]:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)]:.2f} ms, {len(latencies)} requests, "
        f"concurrency {concurrency}{', under cProfile' if profiler else ''})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["service", "pass-through"], nargs="?", default="service")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--profile", help="write cProfile stats here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ra-inprocess-"))
    upstream, process = start_upstream(tmp, delay_ms=0)
    try:
        app, headers = build(args.which, tmp, upstream)
        uvloop.run(measure(app, headers, args.requests, args.concurrency, args.profile))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
