"""The connection guard on a real `reasoning-agent serve`, with raw sockets: oversized heads
are refused before they are read, slow and idle connections are closed, a bound on
connections answers 503, and the metrics port keeps the same limits without a thread each."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reasoning_agent.http_protocol import MAX_HEAD_BYTES, MAX_HEADERS, MAX_REQUEST_LINE
from tests.conftest import StartService, module_service
from tests.fake_openai import FakeOpenAI
from tests.support import ALICE, Service, free_port

pytestmark = pytest.mark.database_agnostic  # no table is read or written


def connect(port: int, *, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def answer(sock: socket.socket) -> tuple[int | None, dict]:
    """The status and JSON body of what comes back before the server closes; (None, {}) if it
    closes without a word."""
    reply = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            reply += chunk
    if not reply:
        return None, {}
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else {}


@contextlib.contextmanager
def polling_livez(service: Service) -> Iterator[list[int | str]]:
    """Polls /livez until the block ends; the statuses, or the errors, of every poll."""
    seen: list[int | str] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=service.base_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    seen.append(client.get("/livez").status_code)
                except httpx.HTTPError as exc:
                    seen.append(exc.__class__.__name__)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield seen
    finally:
        stop.set()
        poller.join(timeout=60)


guarded = module_service(
    "guarded", HEAD_TIMEOUT_S="1", KEEPALIVE_S="1", METRICS_PORT=str(free_port())
)


HEAD_START = b"GET /livez HTTP/1.1\r\nHost: x\r\n"


def post_head(length: int) -> bytes:
    """The head of a keyed POST /task whose JSON body is `length` bytes."""
    return (
        b"POST /task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-API-Key: {ALICE}\r\nContent-Length: {length}\r\n\r\n".encode()
    )


@pytest.mark.parametrize(
    ("sent", "status", "error_type"),
    [
        (HEAD_START + b"X-Big: " + b"a" * (MAX_HEAD_BYTES + 1), 431, "headers_too_large"),
        (b"GET /" + b"a" * (MAX_REQUEST_LINE + 1), 414, "uri_too_long"),
        (
            HEAD_START + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
            431,
            "headers_too_large",
        ),
        (HEAD_START + b"X-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431, "headers_too_large"),
    ],
    ids=["one huge header", "a huge request line", "too many headers", "a whole head"],
)
def test_an_oversized_head_is_answered_before_the_rest_is_sent(
    guarded: Service, sent: bytes, status: int, error_type: str
) -> None:
    """The head is never finished (but in the last case, which comes whole in one read), so
    the answer cannot have waited for it."""
    with connect(guarded.port) as sock:
        sock.sendall(sent)
        assert answer(sock) == (status, answer_body(error_type))


def answer_body(error_type: str) -> dict:
    messages = {
        "headers_too_large": f"request headers are larger than {MAX_HEAD_BYTES} bytes or "
        f"more than {MAX_HEADERS}",
        "uri_too_long": f"request line is longer than {MAX_REQUEST_LINE} bytes",
        "request_timeout": "the request head did not arrive in time",
        "unavailable": "too many connections to this worker; retry",
    }
    return {"error": {"type": error_type, "message": messages[error_type]}}


def test_huge_headers_sent_whole_stall_nobody(guarded: Service) -> None:
    """A 32 MB header, then two of 100 MB at once: each refused, /livez answered throughout,
    and the worker is never killed for blocking."""
    pids_before = _worker_pids(guarded)

    def send_huge(megabytes: int, replies: list) -> None:
        with connect(guarded.port, timeout=60) as sock:
            # Refused while still sending: the answer is read all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(HEAD_START + b"X-Big: " + b"a" * (megabytes << 20) + b"\r\n\r\n")
            replies.append(answer(sock)[0])

    replies: list[int | None] = []
    with polling_livez(guarded) as seen:
        send_huge(32, replies)
        senders = [threading.Thread(target=send_huge, args=(100, replies)) for _ in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=60)
    assert replies == [431, 431, 431]
    assert seen and set(seen) == {200}
    assert _worker_pids(guarded) == pids_before


def _worker_pids(service: Service) -> set[int]:
    with httpx.Client(base_url=service.base_url, timeout=10) as client:
        client.get("/livez")
    return {
        json.loads(line)["pid"] for line in service.logs().splitlines() if '"Booting worker' in line
    }


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"GET /liv", (408, answer_body("request_timeout"))),  # half a request line
        (HEAD_START + b"X-Half: ", (408, answer_body("request_timeout"))),  # half the headers
        (b"", (None, {})),  # nothing at all: closed, nobody to answer
    ],
    ids=["half a request line", "half the headers", "nothing"],
)
def test_a_head_that_stops_arriving_is_timed_out(
    guarded: Service, sent: bytes, expected: tuple
) -> None:
    with connect(guarded.port) as sock:  # HEAD_TIMEOUT_S=1; the socket waits up to 10 s
        sock.sendall(sent)
        assert answer(sock) == expected


def _one_response(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection, head and body (which may come apart)."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_idle_keep_alive_connection_and_a_stalled_body_are_closed(guarded: Service) -> None:
    with connect(guarded.port) as sock:
        sock.sendall(HEAD_START + b"\r\n")
        first = _one_response(sock)
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b'{"status":"ok"}')
        assert sock.recv(65536) == b""  # KEEPALIVE_S=1 later, closed by the server

    body = b'{"prompt": "never finished"}'
    with connect(guarded.port) as sock:
        sock.sendall(post_head(len(body)) + body[:10])
        assert answer(sock) == (None, {})  # the body paused past HEAD_TIMEOUT_S: closed
    assert "closed a connection whose request body stopped arriving" in guarded.logs()


def test_slow_connections_past_the_bound_get_503_and_exhaust_no_files(
    start_service: StartService,
) -> None:
    """Started under a soft limit of 256 open files (the hard one is higher), the service
    raises it; 300 half-sent heads then cost no keyed request its answer, and past
    MAX_CONNECTIONS a request gets 503 instead of a reset."""
    service = start_service(open_files=256, HEAD_TIMEOUT_S="5", MAX_CONNECTIONS="250")
    limits = Path(f"/proc/{service.process.pid}/limits").read_text()
    soft, hard = next(line for line in limits.splitlines() if "open files" in line).split()[3:5]
    assert soft == hard and int(soft) > 256

    slow = [connect(service.port) for _ in range(300)]
    try:
        for sock in slow:
            sock.sendall(b"GET /liv")
        with connect(service.port) as sock:
            sock.sendall(HEAD_START + f"X-API-Key: {ALICE}\r\n\r\n".encode())
            assert answer(sock) == (503, answer_body("unavailable"))
    finally:
        for sock in slow:
            sock.close()
    deadline = time.monotonic() + 10
    with service.client() as client:  # once they are gone, keyed requests get through
        while (status := client.get("/query").status_code) == 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert status == 200


def test_the_metrics_port_holds_no_thread_per_connection(guarded: Service) -> None:
    metrics_port = int(guarded.env["METRICS_PORT"])
    master = guarded.process.pid
    threads_before = len(list(Path(f"/proc/{master}/task").iterdir()))
    slow = [connect(metrics_port) for _ in range(200)]
    try:
        for sock in slow:
            sock.sendall(b"GET /metr")
        with httpx.Client(timeout=10) as client:
            scraped = client.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200 and "reasoning_agent_tasks_total" in scraped.text
        assert len(list(Path(f"/proc/{master}/task").iterdir())) == threads_before
        assert answer(slow[0]) == (408, answer_body("request_timeout"))
    finally:
        for sock in slow:
            sock.close()


def test_slow_answers_and_bodies_within_the_timeout_are_served(
    guarded: Service, fake_llm: FakeOpenAI
) -> None:
    """The head timeout bounds the client, never the service: answers that take longer than
    it, twice on one kept-alive connection, and a body sent in two parts both get through."""
    fake_llm.default_delay = 1.5  # HEAD_TIMEOUT_S=1
    with guarded.client() as client:
        replies = [client.post("/task", json={"prompt": f"slow {i}"}) for i in range(2)]
    assert [reply.status_code for reply in replies] == [200, 200]

    fake_llm.default_delay = 0.0
    body = b'{"prompt": "in two parts"}'
    with connect(guarded.port) as sock:
        sock.sendall(post_head(len(body)) + body[:10])
        time.sleep(0.5)
        sock.sendall(body[10:])
        assert _one_response(sock).startswith(b"HTTP/1.1 200 ")
