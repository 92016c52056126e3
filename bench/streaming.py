"""The streaming scenarios of `make bench`: the time a contender adds before the first piece of
a streamed answer reaches its client, and a thousand streams open at once.

Each contender streams the same upstream answer (its first word at once, the rest 50 ms
later): the service's `POST /task` with `"stream": true` (auth, Redis limits, the row
written before the call, the events) and the pass-through's `/stream` (AsyncOpenAI's stream
forwarded as events). Time to first token is measured from the request to the first `delta`
line, minus the same on the upstream alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["streaming"]

PROMPT = {"prompt": "What is the capital of France?"}


async def _first_delta(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], marker: bytes
) -> tuple[float, bool]:
    """Seconds to the first line holding `marker`, and whether the stream then ended well."""
    started = time.perf_counter()
    first, ended = 0.0, False
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not first and marker in line.encode():
                first = time.perf_counter() - started
            if line.startswith("event: done") or line == "data: [DONE]":
                ended = True
    return first, ended and response.status_code == 200


def _target(contender: Any, upstream: str) -> tuple[str, dict[str, Any], dict[str, str], bytes]:
    if contender is None:  # the upstream alone
        body = {"model": "bench-model", "messages": [{"role": "user", "content": "x"}]}
        return f"{upstream}/v1/chat/completions", body | {"stream": True}, {}, b'"content": "The"'
    headers = {"X-API-Key": contender.key} if contender.key else {}
    if contender.name == "service":
        return f"{contender.base_url}/task", PROMPT | {"stream": True}, headers, b"event: delta"
    return f"{contender.base_url}/stream", PROMPT, headers, b"event: delta"


async def _ttft(contender: Any, upstream: str, n: int) -> list[float]:
    url, body, headers, marker = _target(contender, upstream)
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        for _ in range(20):  # warm: connections, caches
            await _first_delta(client, url, body, marker)
        times = []
        for _ in range(n):
            first, ok = await _first_delta(client, url, body, marker)
            assert ok and first, f"{url}: a stream did not end well"
            times.append(first * 1000)
    return times


async def _many(contender: Any, upstream: str, n: int) -> dict[str, float]:
    url, body, headers, marker = _target(contender, upstream)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_first_delta(client, url, body, marker) for _ in range(n)), return_exceptions=True
        )
        wall = time.perf_counter() - started
    ok = sum(1 for r in results if isinstance(r, tuple) and r[1])
    return {"wall_s": wall, "errors": n - ok}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def streaming(tmp: Path, args: Any, *, run: Any) -> dict[str, dict]:
    """Both streaming scenarios; `run` is bench/run.py (its starters and helpers)."""
    n = 200 if args.quick else 1000
    rounds = max(args.rounds, 1)
    upstream, up = run.start_upstream(tmp, delay_ms=0)
    ttft: dict[str, list[dict[str, float]]] = {"upstream": [], "service": [], "pass-through": []}
    try:
        contenders = {
            "service": run.start_service(tmp, upstream, 1),
            "pass-through": run.start_passthrough(tmp, upstream, 1),
        }
        try:
            for _ in range(rounds):  # in turn: upstream, service, pass-through
                for name, contender in [("upstream", None), *contenders.items()]:
                    times = asyncio.run(_ttft(contender, upstream, n))
                    ttft[name].append({"p50": _pct(times, 50), "p99": _pct(times, 99)})
        finally:
            for contender in contenders.values():
                contender.stop()
    finally:
        run.stop(up)
    base = {q: statistics.median(r[q] for r in ttft["upstream"]) for q in ("p50", "p99")}
    added = {
        name: {
            f"{q}_ms": statistics.median(r[q] for r in ttft[name]) - base[q] for q in ("p50", "p99")
        }
        for name in ("service", "pass-through")
    }
    added["upstream alone"] = {f"{q}_ms": base[q] for q in ("p50", "p99")}

    # A thousand streams at once, each open a second (the upstream's rest comes 1 s later).
    slow, slow_process = run.start_upstream(tmp, delay_ms=0, stream_gap_ms=1000)
    many: dict[str, dict[str, float]] = {}
    try:
        for starter in (run.start_service, run.start_passthrough):
            contender = starter(tmp, slow, 2)
            try:
                asyncio.run(_many(contender, slow, 50))  # warm
                row = asyncio.run(_many(contender, slow, 1000))
                row["peak_rss_mb_per_worker"] = max(
                    run.peak_rss_mb(p) for p in run.worker_pids(contender.process)
                )
            finally:
                contender.stop()
            many[contender.name] = row
    finally:
        run.stop(slow_process)
    return {"stream_first_token_added": added, "thousand_streams_1s": many}


def table(scenarios: dict) -> list[str]:
    lines: list[str] = []
    added = scenarios.get("stream_first_token_added")
    if added:
        lines += [
            "",
            "| streamed, 1 connection | added time to first token p50 (ms) | p99 (ms) |",
            "|---|---|---|",
        ]
        for name, row in added.items():
            lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
        service, floor = added["service"], added["pass-through"]
        lines.append(
            f"service over pass-through: p50 {service['p50_ms'] - floor['p50_ms']:+.2f} ms, "
            f"p99 {service['p99_ms'] - floor['p99_ms']:+.2f} ms"
        )
    many = scenarios.get("thousand_streams_1s")
    if many:
        lines += [
            "",
            "| 1000 streams at once, 1 s each, 2 workers | wall (s) | errors | peak RSS per worker (MB) |",
            "|---|---|---|---|",
        ]
        for name, row in many.items():
            lines.append(
                f"| {name} | {row['wall_s']:.2f} | {row['errors']:.0f} | "
                f"{row['peak_rss_mb_per_worker']:.0f} |"
            )
    return lines


if __name__ == "__main__":
    print(json.dumps({"usage": "run through bench/run.py --only stream"}))
