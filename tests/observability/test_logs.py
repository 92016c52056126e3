"""Log lines: JSON, tagged with request and trace ids, and never carrying a credential."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from reasoning_agent.observability import logs

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic


@pytest.fixture
def captured() -> Iterator[logging.Logger]:
    logs.configure_logging("INFO", secrets=["configured-secret-value-123"])
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger("tests.logs")
    logger.stream = stream  # type: ignore[attr-defined]
    yield logger
    handler.setStream(previous)  # type: ignore[attr-defined]


def lines(logger: logging.Logger) -> list[dict]:
    return [json.loads(line) for line in logger.stream.getvalue().splitlines()]  # type: ignore[attr-defined]


def test_credentials_are_redacted_however_they_are_logged(captured: logging.Logger) -> None:
    captured.info("headers %s", {"X-API-Key": "unknown-key-abc", "authorization": "Bearer tok-9"})
    captured.info(
        "oops",
        extra={"headers": {"x-api-key": "another-key-xyz"}, "note": "configured-secret-value-123"},
    )
    captured.warning("connecting with api_key=plain-1 password=hunter2")
    captured.warning("retrying with apikey=plain-2 OPENAI_API_KEY=sk-3, headers {'Api-Key': 'k-4'}")
    text = json.dumps(lines(captured))
    for secret in (
        "unknown-key-abc",
        "tok-9",
        "another-key-xyz",
        "configured-secret-value-123",
        "plain-1",
        "hunter2",
        "plain-2",
        "sk-3",
        "k-4",
    ):
        assert secret not in text
    assert text.count("[REDACTED]") >= 9


def test_lines_carry_request_and_trace_ids(captured: logging.Logger) -> None:
    tracer = TracerProvider().get_tracer("t")
    token = logs.request_id.set("req-42")
    try:
        with tracer.start_as_current_span("work") as span:
            captured.info("inside")
            context = span.get_span_context()
    finally:
        logs.request_id.reset(token)
    captured.info("outside")
    inside, outside = lines(captured)
    assert inside["request_id"] == "req-42"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside and "request_id" not in outside
    assert {"time", "level", "logger", "pid", "message"} <= set(inside)


@pytest.mark.parametrize(
    "secret", ['pass"word-1234', "back\\slash-1234", "pässwörd-1234", "tab\there-1234"]
)
def test_a_secret_that_json_escapes_is_redacted_as_the_line_shows_it(secret: str) -> None:
    logs.configure_logging("INFO", secrets=[secret])
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        logging.getLogger("tests.logs").warning("connecting with %s", secret)
        logging.getLogger("tests.logs").warning("extra", extra={"dsn": f"x://u:{secret}@h"})
    finally:
        handler.setStream(previous)  # type: ignore[attr-defined]
    text = stream.getvalue()
    assert text.count("[REDACTED]") == 2, text
    for form in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        assert form not in text
