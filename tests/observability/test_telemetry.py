"""Tracing in-process with an in-memory exporter: one trace per request, every layer inside it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from reasoning_agent.app import create_app
from reasoning_agent.config import Settings
from reasoning_agent.observability import telemetry
from reasoning_agent.storage import db
from tests.fake_openai import FakeOpenAI, Step
from tests.support import ALICE, OPENAI_KEY, free_port, quiet_uvicorn, redis_url

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def server(upstream: FakeOpenAI, database_url: str) -> Iterator[str]:
    """The app on a loopback port in this process, tracing into EXPORTER."""
    database = database_url
    db.migrate(database)
    settings = Settings(
        api_keys=f"alice:{ALICE}",  # type: ignore[arg-type]
        database_url=database,  # type: ignore[arg-type]
        redis_url=redis_url(),  # type: ignore[arg-type]
        openai_api_key=OPENAI_KEY,  # type: ignore[arg-type]
        openai_base_url=upstream.base_url,
        openai_model="fake-model",
        llm_max_attempts=3,
        llm_timeout_s=10,
        rate_limit="1000/minute",
    )
    app = create_app(settings)
    assert telemetry.setup_tracing(app, exporter=EXPORTER)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "in-process server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    quiet_uvicorn()
    uv.should_exit = True
    thread.join(timeout=20)


def post_task(server: str, prompt: str, **headers: str) -> httpx.Response:
    EXPORTER.clear()
    response = httpx.post(
        f"{server}/task",
        json={"prompt": prompt},
        headers={"X-API-Key": ALICE, **headers},
        timeout=30,
    )
    time.sleep(0.05)  # the server span ends just after the response is sent
    return response


def spans_of(trace_id: str) -> list[ReadableSpan]:
    return [
        s for s in EXPORTER.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id
    ]


def test_one_trace_holds_the_request_auth_limit_redis_database_agent_and_llm(
    server: str, fake_llm: FakeOpenAI
) -> None:
    response = post_task(server, "what is in a trace?")
    assert response.status_code == 200
    task = response.json()
    trace_id = task["trace_id"]
    assert trace_id and len(trace_id) == 32
    assert {format(s.context.trace_id, "032x") for s in EXPORTER.get_finished_spans()} == {trace_id}

    spans = spans_of(trace_id)
    names = [s.name for s in spans]
    root = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert root.name == "POST /task" and root.parent is None
    assert root.attributes["http.route"] == "/task"
    for name in ("authenticate", "rate_limit", "agent.run", "chat fake-model"):
        assert name in names, names
    assert any(
        s.attributes.get("db.system") == "redis" or s.attributes.get("db.system.name") == "redis"
        for s in spans
    ), names
    sql = [s for s in spans if s.attributes.get("db.system") in ("sqlite", "postgresql")]
    assert {s.name.split()[0].upper() for s in sql} >= {"INSERT", "UPDATE"}, [s.name for s in sql]
    for statement in sql:  # statements carry placeholders, never the values
        assert "what is in a trace" not in statement.attributes.get("db.statement", "")

    attempt = next(s for s in spans if s.name == "chat fake-model")
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes["gen_ai.operation.name"] == "chat"
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["gen_ai.request.model"] == "fake-model"
    assert attempt.attributes["gen_ai.response.model"] == "fake-model"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == task["usage"]["prompt_tokens"]
    assert attempt.attributes["gen_ai.usage.output_tokens"] == task["usage"]["completion_tokens"]
    assert attempt.attributes["reasoning_agent.llm.attempt"] == 1
    assert attempt.attributes["reasoning_agent.llm.outcome"] == "ok"
    agent = next(s for s in spans if s.name == "agent.run")
    assert attempt.parent.span_id == agent.context.span_id

    # The upstream got a traceparent whose parent is the attempt span.
    traceparent = fake_llm.requests[-1].headers["traceparent"]
    _, sent_trace, sent_parent, _ = traceparent.split("-")
    assert sent_trace == trace_id and sent_parent == format(attempt.context.span_id, "016x")


def test_a_retried_call_shows_each_attempt_and_marks_failures_as_errors(
    server: str, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(status=500), Step(status=429, headers={"Retry-After": "0"}))
    response = post_task(server, "retry in a trace")
    assert response.status_code == 200 and response.json()["attempts"] == 3
    attempts = sorted(
        (s for s in spans_of(response.json()["trace_id"]) if s.name.startswith("chat ")),
        key=lambda s: s.attributes["reasoning_agent.llm.attempt"],
    )
    assert [
        (s.attributes["reasoning_agent.llm.attempt"], s.attributes["reasoning_agent.llm.outcome"])
        for s in attempts
    ] == [(1, "http_500"), (2, "http_429"), (3, "ok")]
    assert [s.status.status_code for s in attempts] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert attempts[0].events[0].name == "exception"
    assert len({s.parent.span_id for s in attempts}) == 1  # all under the one agent.run span
    senders = [r.headers["traceparent"].split("-")[2] for r in fake_llm.requests]
    assert senders == [format(s.context.span_id, "016x") for s in attempts]


def test_a_failed_task_records_the_error_on_its_spans(server: str, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(status=400))
    response = post_task(server, "refused in a trace")
    assert response.status_code == 502
    spans = spans_of(format(EXPORTER.get_finished_spans()[0].context.trace_id, "032x"))
    agent = next(s for s in spans if s.name == "agent.run")
    assert agent.status.status_code is StatusCode.ERROR
    assert agent.attributes["error.type"] == "UpstreamError"


def test_an_incoming_traceparent_is_continued(server: str, fake_llm: FakeOpenAI) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = post_task(server, "continue my trace", traceparent=f"00-{trace_id}-{parent}-01")
    assert response.json()["trace_id"] == trace_id
    spans = spans_of(trace_id)
    root = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert root.parent is not None and format(root.parent.span_id, "016x") == parent
    assert fake_llm.requests[-1].headers["traceparent"].split("-")[1] == trace_id


def test_no_key_and_no_prompt_text_in_any_span(server: str, fake_llm: FakeOpenAI) -> None:
    prompt = "my secret prompt about project bluebird"
    response = post_task(server, prompt)
    assert response.status_code == 200
    httpx.get(f"{server}/query", params={"q": "bluebird"}, headers={"X-API-Key": ALICE})
    time.sleep(0.05)
    text = " ".join(
        f"{s.name} {dict(s.attributes)} {[dict(e.attributes or {}) for e in s.events]}"
        for s in EXPORTER.get_finished_spans()
    )
    assert "alice" in text  # key names are fine and useful
    for forbidden in (ALICE, OPENAI_KEY, "bluebird"):
        assert forbidden not in text


def test_content_is_captured_only_when_asked(
    server: str, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_CAPTURE_CONTENT", "true")
    response = post_task(server, "capture this prompt")
    attempt = next(s for s in spans_of(response.json()["trace_id"]) if s.name.startswith("chat "))
    assert "capture this prompt" in attempt.attributes["gen_ai.input.messages"]
    assert "fake answer to: capture this prompt" in attempt.attributes["gen_ai.output.messages"]


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not telemetry.tracing_configured({})
    assert telemetry.tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not telemetry.tracing_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )


def test_a_streamed_call_marks_its_first_token_on_the_attempt_span(
    server: str, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(pieces=["a ", "b"], pause=0.05))
    EXPORTER.clear()
    with httpx.Client(timeout=30) as client:
        events = client.post(
            f"{server}/task",
            json={"prompt": "streamed in a trace", "stream": True},
            headers={"X-API-Key": ALICE},
        ).text
    done = json.loads(events.strip().splitlines()[-1].removeprefix("data: "))
    time.sleep(0.05)
    (attempt,) = [s for s in spans_of(done["trace_id"]) if s.name.startswith("chat ")]
    assert [event.name for event in attempt.events] == ["first_token"]
    assert attempt.attributes["reasoning_agent.llm.outcome"] == "ok"
