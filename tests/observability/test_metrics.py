"""Traces, metrics and logs from a real `reasoning-agent serve` with two workers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI, Step
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan
from tests.support import (
    ALICE,
    BOB,
    OPENAI_KEY,
    REPO,
    free_port,
    post_over_both_workers,
    redis_url,
)

SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    server = OTLPReceiver().start()
    yield server
    server.stop()


def wait_for_trace(receiver: OTLPReceiver, trace_id: str, names: set[str]) -> list[ReceivedSpan]:
    deadline = time.monotonic() + 15
    while True:
        spans = receiver.trace(trace_id)
        if names <= {s.name for s in spans}:
            return spans
        assert time.monotonic() < deadline, f"missing {names - {s.name for s in spans}}"
        time.sleep(0.1)


def test_traces_reach_an_otlp_receiver_from_two_workers(
    start_service: StartService, fake_llm: FakeOpenAI, receiver: OTLPReceiver
) -> None:
    service = start_service(
        WORKERS="2",
        REDIS_URL=redis_url(),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_SERVICE_NAME="reasoning-agent-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    fake_llm.script(Step(status=503))
    with service.client() as client:
        response = client.post(
            "/task", json={"prompt": "trace me end to end"}, headers={"traceparent": incoming}
        )
        assert response.status_code == 200 and response.json()["attempts"] == 2
        trace_id = response.json()["trace_id"]
        assert trace_id == "0af7651916cd43dd8448eb211c80319c"
        for i in range(10):  # other traces, spread over both workers
            client.post("/task", json={"prompt": f"filler {i}"})

    spans = wait_for_trace(
        receiver, trace_id, {"POST /task", "agent.run", "authenticate", "rate_limit"}
    )
    root = next(s for s in spans if s.kind == SERVER)
    assert root.parent_id == "b7ad6b7169203331"
    assert {s.service for s in spans} == {"reasoning-agent-test"}
    kinds = {s.attributes.get("db.system") for s in spans}
    assert "redis" in kinds and kinds & {"sqlite", "postgresql"}
    attempts = sorted(
        (s for s in spans if s.name == "chat fake-model"),
        key=lambda s: s.attributes["reasoning_agent.llm.attempt"],
    )
    assert [s.attributes["reasoning_agent.llm.outcome"] for s in attempts] == ["http_503", "ok"]
    assert attempts[0].status == 2 and "exception" in attempts[0].events  # STATUS_CODE_ERROR
    assert attempts[1].attributes["gen_ai.usage.output_tokens"] > 0
    sent = [r.headers["traceparent"] for r in fake_llm.requests[:2]]
    assert [t.split("-")[2] for t in sent] == [s.span_id for s in attempts]

    every = json.dumps([s.attributes for s in receiver.spans])
    for forbidden in (ALICE, BOB, OPENAI_KEY, "trace me end to end", "filler"):
        assert forbidden not in every

    # Log lines are JSON and carry the trace id of their request. A worker writes the access
    # line just after the response has gone, so the last one may still be on its way.
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
        access = [
            line for line in lines if line.get("message") == "request" and line["route"] == "/task"
        ]
        if len(access) >= 11 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    mine = [line for line in lines if line.get("trace_id") == trace_id]
    assert {line["message"] for line in mine} >= {"request", "llm attempt"}
    assert all(re.fullmatch(r"[0-9a-f]{16}", line["span_id"]) for line in mine)
    assert len(access) == 11 and all("trace_id" in line for line in access)
    assert len({line["trace_id"] for line in access}) == 11
    assert not [line for line in lines if "trace me end to end" in json.dumps(line)]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_are_exact_across_two_workers_and_on_the_metrics_port(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    n = 60
    metrics_port = free_port()
    service = start_service(
        WORKERS="2", REDIS_URL=redis_url(), RATE_LIMIT="1000/minute", METRICS_PORT=str(metrics_port)
    )
    sent = post_over_both_workers(service, at_least=n, keys=(ALICE, BOB))
    assert {r.status_code for r in sent} == {200}
    n = len(sent)
    with service.client(ALICE) as alice:
        fake_llm.script(Step(status=400))
        assert alice.post("/task", json={"prompt": "refused"}).status_code == 502
        assert (
            httpx.get(f"{service.base_url}/query", headers={"X-API-Key": "nope-" * 5}).status_code
            == 401
        )
        text = alice.get("/metrics").text

    got = samples(text)

    def value(name: str, **labels: str) -> float:
        return got.get((f"reasoning_agent_{name}", tuple(sorted(labels.items()))), 0.0)

    assert value("http_requests_total", method="POST", route="/task", status="200") == n
    assert value("overhead_seconds_count", route="/task") == n + 1  # the 502 called the LLM too
    assert value("llm_calls_total", provider="openai", model="fake-model", outcome="ok") == n
    assert (
        value("llm_calls_total", provider="openai", model="fake-model", outcome="upstream_error")
        == 1
    )
    assert value("llm_call_duration_seconds_count", provider="openai", model="fake-model") == n + 1
    assert value("tasks_total", status="completed") == n
    assert value("tasks_total", status="failed") == 1
    assert value("auth_failures_total") == 1
    input_tokens = value("llm_tokens_total", key="alice", direction="input") + value(
        "llm_tokens_total", key="bob", direction="input"
    )
    assert input_tokens == 2 * n  # "spread {i}" is two words
    assert value("llm_tokens_total", key="alice", direction="output") > 0
    assert value("http_requests_in_flight") == 1  # the scrape itself

    # The metrics port serves the same families without a key.
    unauthenticated = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    other = samples(unauthenticated)
    key = (
        "reasoning_agent_http_requests_total",
        (("method", "POST"), ("route", "/task"), ("status", "200")),
    )
    assert other[key] == n

    # Every family we export is documented in the README, with its labels.
    readme = (REPO / "README.md").read_text()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("reasoning_agent_"):
            assert f"`{family.name}" in readme, family.name
            labels = {label for s in family.samples for label in s.labels if label != "le"}
            row = next(line for line in readme.splitlines() if line.startswith(f"| `{family.name}"))
            assert all(f"`{label}`" in row for label in labels), (family.name, labels)
    for secret in (ALICE, BOB, OPENAI_KEY):
        assert secret not in text


def test_a_bad_exporter_protocol_stops_the_start(start_service: StartService) -> None:
    with pytest.raises(RuntimeError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        start_service(
            OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317", OTEL_EXPORTER_OTLP_PROTOCOL="grpc"
        )
