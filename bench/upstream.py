"""A fast OpenAI-compatible upstream for the benchmark: one fixed answer after `--delay-ms`
(streamed, for `"stream": true`: the first word at once, the rest `--stream-gap-ms` later).

An asyncio protocol on httptools' C parser (no ASGI server, no framework): the upstream shares
the two cores with the contenders, so each request to it costs as little CPU as it can
(~4x less than the same answer from a bare ASGI app under uvicorn). Every contender pays
the same for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httptools
import uvloop

ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The capital of France is Paris."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
)


def _chunk(delta: dict | None, **extra: object) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, **extra}]
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0}
    body |= {"model": "bench-model", "choices": choices}
    if delta is None:
        body["usage"] = extra
    event = b"data: " + json.dumps(body).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)  # one HTTP chunk per event


WORDS = ["The", " capital", " of", " France", " is", " Paris."]
# A streamed answer: its head and first word at once, the rest `--stream-gap-ms` later.
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + _chunk({"role": "assistant", "content": ""})
    + _chunk({"content": WORDS[0]})
)
STREAM_TAIL = (
    b"".join(_chunk({"content": word}) for word in WORDS[1:])
    + _chunk({}, finish_reason="stop")
    + _chunk(None, prompt_tokens=12, completion_tokens=7, total_tokens=19)
    + b"%x\r\ndata: [DONE]\n\n\r\n0\r\n\r\n" % len(b"data: [DONE]\n\n")
)


class Upstream(asyncio.Protocol):
    """Answers every POST on a keep-alive connection `delay_s` after it came, anything else at once."""

    def __init__(self, delay_s: float, gap_s: float = 0.0) -> None:
        self._delay_s = delay_s
        self._gap_s = gap_s
        self._body = bytearray()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self._transport.close()

    def on_body(self, body: bytes) -> None:  # called by the parser
        self._body += body

    def on_message_complete(self) -> None:  # called by the parser
        streamed = b'"stream":true' in self._body.replace(b" ", b"")
        self._body.clear()
        answer = self._stream if streamed else self._answer
        if self._delay_s and self._parser.get_method() == b"POST":  # readiness checks: at once
            self._loop.call_later(self._delay_s, answer)
        else:
            answer()

    def _answer(self) -> None:
        self._write(RESPONSE)

    def _stream(self) -> None:
        self._write(STREAM_HEAD)
        self._loop.call_later(self._gap_s, self._write, STREAM_TAIL)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(port: int, delay_s: float, gap_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Upstream(delay_s, gap_s), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--stream-gap-ms", type=float, default=50.0)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.delay_ms / 1000, args.stream_gap_ms / 1000))


if __name__ == "__main__":
    main()
