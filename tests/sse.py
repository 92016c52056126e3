"""Reading Server-Sent Events as a client sees them, comment lines included."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    id: int
    kind: str
    data: dict
    at: float = 0.0  # seconds since the request, when it was read


@dataclass
class Stream:
    headers: httpx.Headers
    events: list[Event]
    comments: list[tuple[float, str]]  # (seconds since the request, text)


def read_stream(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    stop_after: int | None = None,
    **options: object,
) -> Stream:
    """Read an event stream line by line, as a client sees it; with `stop_after`, hang up
    after that many events."""
    started = time.monotonic()
    events: list[Event] = []
    comments: list[tuple[float, str]] = []
    with client.stream(method, url, **options) as response:  # type: ignore[arg-type]
        assert response.status_code == 200, response.read()
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append((time.monotonic() - started, line[1:].strip()))
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            elif fields:
                events.append(
                    Event(
                        int(fields["id"]),
                        fields["event"],
                        json.loads(fields["data"]),
                        time.monotonic() - started,
                    )
                )
                fields = {}
                if stop_after is not None and len(events) >= stop_after:
                    break
        return Stream(response.headers, events, comments)


def deltas(stream: Stream, part: str = "text") -> str:
    return "".join(e.data.get(part, "") for e in stream.events if e.kind == "delta")
