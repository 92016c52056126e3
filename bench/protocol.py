"""CPU per request of the connection guard against uvicorn's own httptools protocol: one
keep-alive connection fed the same small POST again and again, in-process, to a trivial app.

Nothing but the protocol differs between the two, so the difference is what the guard costs.

    .venv/bin/python bench/protocol.py [--requests 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from reasoning_agent.http_protocol import GuardedHttpProtocol

REQUEST = (
    b"POST /task HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nX-API-Key: bench-key-0123456789abcdef\r\n"
    b"Content-Type: application/json\r\nContent-Length: 17\r\nAccept: */*\r\n"
    b'User-Agent: wrk\r\n\r\n{"prompt": "hi"}\n'
)


async def app(scope: dict, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class Transport(asyncio.Transport):
    """Takes what the protocol writes and counts it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def microseconds_per_request(protocol_class: type, requests: int) -> float:
    config = Config(app=app, log_config=None, access_log=False, lifespan="off")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    started = time.perf_counter()
    for _ in range(requests):
        protocol.data_received(REQUEST)
        await asyncio.sleep(0)  # the app's task runs
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    assert transport.writes >= requests, "every request was answered"
    protocol.connection_lost(None)
    return elapsed / requests * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"uvicorn httptools": [], "guarded": []}
    for _ in range(args.rounds):  # alternating, so a slower spell of the machine hits both
        results["uvicorn httptools"].append(
            await microseconds_per_request(HttpToolsProtocol, args.requests)
        )
        results["guarded"].append(
            await microseconds_per_request(GuardedHttpProtocol, args.requests)
        )
    base = statistics.median(results["uvicorn httptools"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:18} {median:6.1f} us/request (median of {args.rounds}), {median / base:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
