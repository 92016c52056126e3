"""Hostile input: oversized, malformed and abusive requests get a 4xx, never a 5xx or a hang."""

from __future__ import annotations

import hmac
import re
import socket
import time

import pytest

from reasoning_agent.keys import KeyRing
from tests.inprocess import InProcessApp
from tests.support import ALICE, BOB, REPO, Service

README = (REPO / "README.md").read_text()


def raw_request(service: Service, data: bytes, *, timeout: float = 5) -> bytes:
    """Send bytes as they are and read what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
                head, _, body = reply.partition(b"\r\n\r\n")
                if _ and b"content-length" not in head.lower():
                    break
                length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return reply


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_a_10_mb_body_is_refused_without_being_read(shared_service: Service) -> None:
    head = (
        "POST /task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {ALICE}\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    reply = raw_request(shared_service, head + b'{"prompt": "' + b"x" * 1024)  # 1 KB of 10 MB
    assert status_of(reply) == 413
    assert b'"payload_too_large"' in reply
    assert time.monotonic() - started < 3  # answered without waiting for the other 10 MB


@pytest.mark.parametrize(
    ("request_bytes", "allowed"),
    [
        (
            b"GET /query HTTP/1.1\r\nHost: x\r\nX-API-Key: " + b"k" * 70_000 + b"\r\n\r\n",
            {400, 401, 431},
        ),
        (
            b"GET /query HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ALICE.encode() + b"\x00\r\n\r\n",
            {400, 401},
        ),
        (
            b"GET /query HTTP/1.1\r\nHost: x\r\nX-API-Key: \xff\xfe" + ALICE.encode() + b"\r\n\r\n",
            {400, 401},
        ),
        (
            b"GET /qu\xffery HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ALICE.encode() + b"\r\n\r\n",
            {400, 404},
        ),
        (b"GARBAGE\r\n\r\n", {400}),
    ],
    ids=[
        "70 KB key header",
        "NUL in a header",
        "invalid UTF-8 header",
        "invalid UTF-8 path",
        "not HTTP",
    ],
)
def test_header_and_request_line_abuse_gets_4xx(
    shared_service: Service, request_bytes: bytes, allowed: set[int]
) -> None:
    reply = raw_request(shared_service, request_bytes)
    assert reply, "no answer at all"
    assert status_of(reply) in allowed, reply[:200]


@pytest.mark.parametrize(
    ("params", "status", "error_type"),
    [
        ("&".join(f"p{i}=1" for i in range(3000)), 414, "uri_too_long"),
        ("&".join(f"p{i}=1" for i in range(100)), 400, "bad_request"),
        ("q=%ff%fe", 400, "bad_request"),
        ("q=%00", 422, "invalid_request"),
        ("limit=1e9999", 422, "invalid_request"),
        ("since=9999-99-99", 422, "invalid_request"),
    ],
    ids=["3000 parameters", "100 parameters", "invalid UTF-8", "NUL", "huge number", "bad date"],
)
def test_query_abuse_gets_4xx(
    shared_service: Service, params: str, status: int, error_type: str
) -> None:
    with shared_service.client() as client:
        response = client.get(f"/query?{params}")
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type


def test_invalid_utf8_in_a_body_is_a_400(shared_service: Service) -> None:
    with shared_service.client() as client:
        response = client.post(
            "/task",
            content=b'{"prompt": "\xff\xfe bad"}',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "bad_request"


def test_wrong_keys_are_counted(shared_service: Service) -> None:
    with shared_service.client() as client:
        before = _auth_failures(client.get("/metrics").text)
    with shared_service.client("wrong-key-0123456789abcdef") as stranger:
        assert [stranger.get("/query").status_code for _ in range(3)] == [401] * 3
    with shared_service.client() as client:
        assert _auth_failures(client.get("/metrics").text) == before + 3


def _auth_failures(metrics: str) -> float:
    line = next(
        m for m in metrics.splitlines() if m.startswith("reasoning_agent_auth_failures_total ")
    )
    return float(line.split()[1])


def test_every_key_is_compared_whatever_is_presented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: a right key, a near miss and nonsense all cost one comparison per known key."""
    ring = KeyRing(inline=f"alice:{ALICE},bob:{BOB},c:{'c' * 20},d:{'d' * 20}", file=None)
    calls = 0
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in (ALICE, BOB, ALICE[:-1] + "x", "nonsense-but-long-enough", "d" * 20):
        calls = 0
        ring.authenticate(presented)
        assert calls == 4, presented


def test_the_query_string_limit_is_where_the_readme_says(shared_app: InProcessApp) -> None:
    documented = re.search(r"^\| 414 \| a query string over (\d+) KB", README, re.MULTILINE)
    assert documented, "the README's 414 row"
    limit = int(documented.group(1)) * 1024
    with shared_app.client() as client:
        at_limit = client.get("/query", params={"q": "x" * (limit - len("q="))})
        past_it = client.get("/query", params={"q": "x" * (limit - len("q=") + 1)})
    assert at_limit.status_code == 422  # reaches validation: q is capped at 500 characters
    assert past_it.status_code == 414 and past_it.json()["error"]["type"] == "uri_too_long"
