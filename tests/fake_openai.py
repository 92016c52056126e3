"""A fake OpenAI-compatible server on loopback, with scripted failures, for the real `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.loopback import LoopbackServer


@dataclass
class Step:
    """What the server does for one request: fail with `status`, wait `delay`, hang, drop the
    connection (`reset`), or send `raw` bytes as a 200 JSON body (`chunked`: without a
    Content-Length, in pieces)."""

    status: int = 200
    delay: float = 0.0
    hang: bool = False
    reset: bool = False
    raw: bytes | None = None
    chunked: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    # For a streamed request (`stream: true`): the answer's pieces (default: its words), the
    # reasoning's pieces sent first, a pause before each piece, a silence before the first,
    # a dropped connection after `break_after` pieces, and the usage chunk (None: none sent);
    # or `chunks`: these JSON values as the stream's data lines, whatever their shape.
    chunks: list[Any] | None = None
    pieces: list[str] | None = None
    reasoning: list[str] = field(default_factory=list)
    pause: float = 0.0
    silence: float = 0.0
    break_after: int | None = None
    usage: dict[str, Any] | None = field(default_factory=lambda: {"default": True})


_DONE = b"data: [DONE]\n\n"


def _data_line(value: Any) -> bytes:
    """One Server-Sent Event holding `value` as JSON, as a streamed completion sends it."""
    return f"data: {json.dumps(value)}\n\n".encode()


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """Answers /v1/chat/completions; `script()` queues steps, `requests` records what came in."""

    def __init__(self) -> None:
        self._steps: deque[Step] = deque()
        self._lock = threading.Lock()
        self.requests: list[Received] = []
        self.default_delay = 0.0
        self._release = threading.Event()
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        self._http = LoopbackServer(app)
        self.port = self._http.port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._http.start()
        return self

    def stop(self) -> None:
        self._release.set()  # hung answers end first
        self._http.stop()

    def reset(self) -> None:
        with self._lock:
            self._steps.clear()
            self.requests.clear()
            self.default_delay = 0.0
        self._release.set()
        self._release = threading.Event()

    def script(self, *steps: Step) -> None:
        with self._lock:
            self._steps.extend(steps)

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.requests.append(Received(time.monotonic(), dict(request.headers), body))
            step = self._steps.popleft() if self._steps else Step(delay=self.default_delay)
            release = self._release
        if step.hang:
            while not release.is_set():
                await asyncio.sleep(0.05)
            return Response(status_code=499)
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.reset:  # drop the connection without an answer
            request.receive.__self__.transport.abort()  # type: ignore[attr-defined]
            return Response(status_code=499)
        if step.raw is not None and step.chunked:
            raw = step.raw

            async def pieces() -> AsyncIterator[bytes]:
                for start in range(0, len(raw), 65536):
                    yield raw[start : start + 65536]

            return StreamingResponse(pieces(), media_type="application/json")
        if step.raw is not None:
            return Response(step.raw, media_type="application/json")
        if step.status != 200:
            error = {"error": {"message": f"scripted {step.status}", "type": "fake", "code": None}}
            return JSONResponse(step.body or error, status_code=step.status, headers=step.headers)
        if step.body is not None:
            return JSONResponse(step.body, headers=step.headers)
        prompt = body["messages"][-1]["content"]
        answer = f"fake answer to: {prompt}"
        if body.get("stream"):
            return self._streamed(request, body, step, answer, prompt)
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake-model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(answer.split()),
                    "total_tokens": len(prompt.split()) + len(answer.split()),
                },
            },
            headers=step.headers,
        )

    def _streamed(
        self, request: Request, body: dict[str, Any], step: Step, answer: str, prompt: str
    ) -> StreamingResponse:
        """Chat completion chunks as Server-Sent Events, as OpenAI streams them."""
        pieces = step.pieces if step.pieces is not None else re.findall(r"\s*\S+", answer)
        usage = step.usage
        if usage is not None and usage.get("default"):
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(pieces) + len(step.reasoning),
                "total_tokens": len(prompt.split()) + len(pieces) + len(step.reasoning),
            }
        model = body.get("model", "fake-model")
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(
            delta: dict[str, Any] | None, *, finish: str | None = None, usage: Any = None
        ) -> bytes:
            choices = [] if delta is None else [{"index": 0, "delta": delta}]
            if finish:
                choices[0]["finish_reason"] = finish
            payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
            payload.update(model=model, choices=choices, usage=usage)
            return _data_line(payload)

        async def events() -> AsyncIterator[bytes]:
            if step.chunks is not None:
                for value in step.chunks:
                    yield _data_line(value)
                yield _DONE
                return
            yield chunk({"role": "assistant", "content": ""})
            if step.silence:
                await asyncio.sleep(step.silence)
            parts = [("reasoning_content", r) for r in step.reasoning]
            parts += [("content", p) for p in pieces]
            for sent, (kind, piece) in enumerate(parts):
                if step.break_after is not None and sent >= step.break_after:
                    request.receive.__self__.transport.abort()  # type: ignore[attr-defined]
                    return
                if step.pause:
                    await asyncio.sleep(step.pause)
                yield chunk({kind: piece})
            yield chunk({}, finish="stop")
            if wants_usage and usage is not None:
                yield chunk(None, usage=usage)
            yield _DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=step.headers)
