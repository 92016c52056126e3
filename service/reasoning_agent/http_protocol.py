"""The HTTP connection guard: uvicorn's httptools protocol with bounds on what a client without
a key can make a worker hold: head size, slow or idle connections, connections at once."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ConnectionLimits", "GuardedHttpProtocol", "protocol_with", "raise_open_file_limit"]

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 17 * 1024  # above the app's query-string limit, so that one answers first
MAX_HEAD_BYTES = 64 * 1024  # request line and every header together
MAX_HEADERS = 100
_FD_RESERVE = 128  # files a worker needs besides its connections (database, Redis, logs)
LINGER_S = 2.0  # after a refusal, read and drop for this long so the client sees the answer


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    head_timeout_s: float  # for a request head to arrive, and for a body to go on
    max_connections: int  # per worker; past it new requests get 503


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a kernel cap below the hard limit: keep what we have
            pass
    return soft


def protocol_with(limits: ConnectionLimits, *, open_files: int) -> type[GuardedHttpProtocol]:
    """The protocol class for these limits, its bound kept below the open-file limit so that
    clients past it get a 503 rather than a failed accept()."""

    class Configured(GuardedHttpProtocol):
        max_connections = max(1, min(limits.max_connections, open_files - _FD_RESERVE))
        head_timeout_s = limits.head_timeout_s

    return Configured


def _canned(status: int, reason: str, type_: str, message: str) -> bytes:
    """A whole response in the service's error shape, for answers made before any app runs."""
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


_LINE_TOO_LONG = _canned(
    414, "URI Too Long", "uri_too_long", f"request line is longer than {MAX_REQUEST_LINE} bytes"
)
_HEAD_TOO_LARGE = _canned(
    431,
    "Request Header Fields Too Large",
    "headers_too_large",
    f"request headers are larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADERS}",
)
_HEAD_TIMEOUT = _canned(
    408, "Request Timeout", "request_timeout", "the request head did not arrive in time"
)
_TOO_MANY = _canned(
    503, "Service Unavailable", "unavailable", "too many connections to this worker; retry"
)


class GuardedHttpProtocol(HttpToolsProtocol):
    """Counts a request head's bytes as they arrive and answers 414/431 once past a bound,
    before the rest is read; closes heads and bodies that stall; and past `max_connections`
    answers 503 instead of holding more. A request that comes in one read arms no timer."""

    max_connections: ClassVar[int] = 10_000
    head_timeout_s: ClassVar[float] = 10.0

    _in_head: bool
    _line_done: bool
    _head_bytes: int
    _line_bytes: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_bound = len(self.connections) > self.max_connections
        self._refused = False
        self._body_pending = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._await_head()
        # Armed at once, so a connection that never sends a byte is closed too.
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_timeout_s, self._head_timed_out
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped unread
        counted = self._in_head
        if counted:
            if not self._line_done:
                end = data.find(b"\n")
                self._line_bytes += len(data) if end < 0 else end
                self._line_done = end >= 0
            self._head_bytes += len(data)
        else:  # more of the body: it has not stalled
            self._stop_body_timer()
        super().data_received(data)
        if self._refused:
            return
        if self._in_head and self._head_bytes:
            # Still incomplete after this read: judged on what has come so far, so a huge
            # head is refused one read past the bound, never read whole.
            if not self._line_done and self._line_bytes > MAX_REQUEST_LINE:
                self._refuse(_LINE_TOO_LONG)
            elif self._head_bytes - self._line_bytes > MAX_HEAD_BYTES:
                self._refuse(_HEAD_TOO_LARGE)
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        elif self._body_pending and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.head_timeout_s, self._body_timed_out)

    # Parser callbacks, run inside data_received: after a refusal they only return.
    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._stop_head_timer()
        if len(self.url) > MAX_REQUEST_LINE:  # a head that came whole in one read
            self._refuse(_LINE_TOO_LONG)
        elif len(self.headers) > MAX_HEADERS or (
            self._head_bytes - self._line_bytes > MAX_HEAD_BYTES
            and sum(len(name) + len(value) + 4 for name, value in self.headers) > MAX_HEAD_BYTES
        ):
            self._refuse(_HEAD_TOO_LARGE)
        elif self._over_bound:
            log.warning("refused a request past MAX_CONNECTIONS=%d", self.max_connections)
            self._refuse(_TOO_MANY)
        else:
            self._body_pending = True
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._body_pending = False
        self._stop_body_timer()
        self._await_head()  # what comes next on this connection is another request's head
        super().on_message_complete()

    def _await_head(self) -> None:
        self._in_head = True
        self._head_bytes = self._line_bytes = 0
        self._line_done = False

    def _refuse(self, response: bytes) -> None:
        """Answer before any app runs; then send nothing more, drop what still comes for
        LINGER_S (closing on unread bytes would reset the connection before the client read
        the answer), and close."""
        self._refused = True
        self._cancel_timers()
        if self.transport.is_closing():
            return
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self._refuse(_HEAD_TIMEOUT)
        elif not self.transport.is_closing():
            self.transport.close()  # never sent a byte: nobody to answer

    def _body_timed_out(self) -> None:
        """The body stopped arriving: the app waiting for it sees the client gone."""
        self._body_timer = None
        log.warning("closed a connection whose request body stopped arriving")
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        self._stop_head_timer()
        self._stop_body_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
