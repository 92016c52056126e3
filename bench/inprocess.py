"""CPU per request with no server and no load generator: the ASGI app called in-process.

The numbers are steadier than wrk's on a shared 2-core machine (same run twice: within ~3%),
so this is the tool for telling whether a change to the hot path helped. The upstream is
bench/upstream.py on loopback, Redis the local one, SQLite a fresh file. With `--stream` each
request streams its answer, and the latencies are to the first `delta` event.

    .venv/bin/python bench/inprocess.py [service|pass-through] [--requests 3000]
        [--concurrency 1] [--stream] [--profile out.prof]   # then: python -m pstats out.prof
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
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import service_env, start_upstream
from tests.support import ALICE

PROMPT = {"prompt": "What is the capital of France?"}


@dataclass(frozen=True)
class Request:
    """What every request of a run sends, and the body bytes its latency is measured to."""

    path: str
    body: bytes
    headers: list[tuple[bytes, bytes]]
    marker: bytes | None = None  # None: to the end of the response


def build(which: str, tmp: Path, upstream: str, *, stream: bool) -> tuple[object, Request]:
    """The app and the request sent to it."""
    if which == "pass-through":
        path, body = ("/stream" if stream else "/task"), PROMPT
    else:
        path, body = "/task", (PROMPT | {"stream": True}) if stream else PROMPT
    sent = json.dumps(body).encode()
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(sent)).encode()))
    marker = b"event: delta" if stream else None
    if which == "pass-through":
        os.environ["OPENAI_BASE_URL"] = f"{upstream}/v1"
        from passthrough import app

        return app, Request(path, sent, headers, marker)
    os.environ.update(service_env(tmp / "service.db", upstream))
    cli = Path(sys.executable).parent / "reasoning-agent"
    subprocess.run([str(cli), "migrate"], check=True, capture_output=True)
    from reasoning_agent.app import create_app

    app = create_app()
    log_file = (tmp / "service.log").open("w")
    for handler in logging.getLogger().handlers:  # a file, as under gunicorn, not the terminal
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_file)
    return app, Request(path, sent, [*headers, (b"x-api-key", ALICE.encode())], marker)


async def one(app: object, request: Request) -> float:
    """Seconds to the request's marker (or to the end of its response)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": request.headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    statuses: list[int] = []
    marked: float | None = None
    started = time.perf_counter()

    async def send(message: dict) -> None:
        nonlocal marked
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif marked is None and request.marker and request.marker in message.get("body", b""):
            marked = time.perf_counter()

    await app(scope, receive, send)  # type: ignore[operator]
    assert statuses == [200], statuses
    assert marked is not None or request.marker is None, "the marker was never sent"
    return (marked or time.perf_counter()) - started


@contextlib.asynccontextmanager
async def lifespan(app: object) -> AsyncIterator[None]:
    router = getattr(app, "router", None)
    if router is None or router.lifespan_context is None:
        yield
        return
    async with router.lifespan_context(app):
        yield


async def measure(
    app: object, request: Request, requests: int, concurrency: int, profile: str | None
) -> None:
    async with lifespan(app):
        for _ in range(200):
            await one(app, request)
        latencies: list[float] = []

        async def client() -> None:
            for _ in range(requests // concurrency):
                latencies.append(await one(app, request) * 1000)

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
        f"concurrency {concurrency}{', to the first delta' if request.marker else ''}"
        f"{', under cProfile' if profiler else ''})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["service", "pass-through"], nargs="?", default="service")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--stream", action="store_true", help="streamed answers")
    parser.add_argument("--profile", help="write cProfile stats here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ra-inprocess-"))
    upstream, process = start_upstream(tmp, delay_ms=0, stream_gap_ms=0)
    try:
        app, request = build(args.which, tmp, upstream, stream=args.stream)
        uvloop.run(measure(app, request, args.requests, args.concurrency, args.profile))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
