"""Probes, /healthz, /metrics and request ids."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartService, base_env
from tests.fake_openai import FakeOpenAI, Step
from tests.inprocess import InProcessApp, running
from tests.support import ALICE, BOB, free_port, redis_url


def test_probes_need_no_key_and_return_no_data(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock")
    with service.client(key=None) as anonymous:
        assert anonymous.get("/livez").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json() == {"status": "ok"}
        assert anonymous.get("/healthz").status_code == 401


def test_healthz_reports_each_check(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock", REDIS_URL=redis_url())
    with service.client() as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {
            "status": "ok",
            "checks": {"database": "ok", "redis": "ok", "llm": "ok (mock)"},
        }


def test_redis_down_degrades_health_and_limits_fall_back(start_service: StartService) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    service = start_service(LLM_PROVIDER="mock", REDIS_URL=dead, RATE_LIMIT="2/minute")
    with service.client() as client:
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and health["checks"]["redis"] == "fail"
        statuses = [client.post("/task", json={"prompt": "x"}).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]  # limited in-process while Redis is away
    assert service.logs().count("rate-limit store unreachable") == 1


def test_an_unconfigured_provider_answers_503_and_stores_nothing(
    start_service: StartService,
) -> None:
    service = start_service(OPENAI_API_KEY="")
    with service.client() as client:
        response = client.post("/task", json={"prompt": "hello"})
        assert response.status_code == 503
        assert "OPENAI_API_KEY" in response.json()["error"]["message"]
        assert client.get("/query").json()["items"] == []
        health = client.get("/healthz").json()
        assert health["status"] == "degraded"
        assert health["checks"]["llm"] == "not configured: OPENAI_API_KEY is not set"


def test_the_mock_provider_answers_offline_and_says_so(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    with service.client() as client:
        first = client.post("/task", json={"prompt": "the same prompt"}).json()
        second = client.post("/task", json={"prompt": "the same prompt"}).json()
        assert first["status"] == "completed" and first["model"] == "mock"
        assert first["answer"].startswith("[mock answer ")
        assert first["answer"] == second["answer"] and first["id"] != second["id"]


def test_request_ids_are_taken_or_made_and_logged(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock")
    with service.client() as client:
        given = client.get("/query", headers={"X-Request-ID": "trace-me-123"})
        assert given.headers["X-Request-ID"] == "trace-me-123"
        made = client.get("/query", headers={"X-Request-ID": "bad id with spaces"})
        assert len(made.headers["X-Request-ID"]) == 32
        assert client.get("/livez").headers["X-Request-ID"]
    lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "trace-me-123"]
    assert access and access[-1] | {"duration_ms": 0, "time": 0, "pid": 0} == {
        "time": 0,
        "level": "INFO",
        "logger": "reasoning_agent.access",
        "pid": 0,
        "message": "request",
        "method": "GET",
        "route": "/query",
        "status": 200,
        "duration_ms": 0,
        "key": "alice",
        "request_id": "trace-me-123",
    }


def test_metrics_count_requests_tasks_attempts_and_429s(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    service = start_service(RATE_LIMIT="2/minute")
    with service.client() as client:
        client.post("/task", json={"prompt": "ok"})
        fake_llm.script(Step(status=500), Step(status=400))
        client.post("/task", json={"prompt": "fails"})
        client.post("/task", json={"prompt": "limited 1"})
        client.post("/task", json={"prompt": "limited 2"})
        client.get("/task/does-not-exist")
        text = client.get("/metrics").text

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    p = "reasoning_agent_"
    assert value(f"{p}http_requests_total", method="POST", route="/task", status="200") == 1
    assert value(f"{p}http_requests_total", method="POST", route="/task", status="502") == 1
    assert value(f"{p}http_requests_total", method="POST", route="/task", status="429") == 2
    assert (
        value(f"{p}http_requests_total", method="GET", route="/task/{task_id}", status="404") == 1
    )
    assert value(f"{p}tasks_total", status="completed") == 1
    assert value(f"{p}tasks_total", status="failed") == 1
    attempts = f"{p}llm_attempts_total"
    assert value(attempts, provider="openai", model="fake-model", outcome="ok") == 1
    assert value(attempts, provider="openai", model="fake-model", outcome="http_500") == 1
    assert value(attempts, provider="openai", model="fake-model", outcome="http_400") == 1
    assert value(f"{p}rate_limited_total", key="alice", scope="task") == 2
    assert value(f"{p}http_request_duration_seconds_count", method="POST", route="/task") == 4


def test_openapi_lists_the_endpoints_and_the_key_scheme(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock")
    with service.client() as client:
        spec = client.get("/openapi.json").json()
    assert {"/task", "/task/{task_id}", "/query", "/healthz", "/metrics"} <= set(spec["paths"])
    schemes = spec["components"]["securitySchemes"]
    assert any(s.get("name") == "X-API-Key" and s.get("in") == "header" for s in schemes.values())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            secured = bool(operation.get("security"))
            assert secured == (path not in ("/livez", "/readyz")), f"{method} {path}"
    assert httpx.get(f"{service.base_url}/openapi.json").status_code == 401


def test_known_series_are_there_at_zero_before_any_event(start_service: StartService) -> None:
    """Dashboards and rate() show 0, not "no data", for what has not happened yet."""
    service = start_service(LLM_PROVIDER="mock")
    with service.client() as client:
        text = client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    p = "reasoning_agent_"
    expected = [
        (f"{p}rate_limited_total", {"key": "bob", "scope": "task"}),
        (f"{p}rate_limited_total", {"key": "alice", "scope": "query"}),
        (f"{p}llm_tokens_total", {"key": "bob", "direction": "output"}),
        (f"{p}tasks_total", {"status": "failed"}),
        (
            f"{p}llm_calls_total",
            {"provider": "mock", "model": "mock", "outcome": "deadline_exceeded"},
        ),
        (f"{p}llm_attempts_total", {"provider": "mock", "model": "mock", "outcome": "ok"}),
        (f"{p}rate_limit_store_errors_total", {"mode": "local"}),
        (f"{p}llm_call_duration_seconds_count", {"provider": "mock", "model": "mock"}),
        (f"{p}overhead_seconds_count", {"route": "/task"}),
    ]
    for name, labels in expected:
        assert samples.get((name, tuple(sorted(labels.items())))) == 0.0, (name, labels)


def test_metrics_on_the_main_port_are_for_admin_keys_only(shared_app: InProcessApp) -> None:
    """They name every tenant's key and its token counts; ADMIN_KEYS=alice in the tests."""
    with shared_app.client(BOB) as bob, shared_app.client(ALICE) as alice:
        refused = bob.get("/metrics")
        allowed = alice.get("/metrics")
    assert refused.status_code == 403
    assert refused.json()["error"] == {
        "type": "forbidden",
        "message": "/metrics is for the keys named in ADMIN_KEYS",
    }
    assert "reasoning_agent_" not in refused.text
    assert allowed.status_code == 200 and "reasoning_agent_http_requests_total" in allowed.text


def test_a_database_that_refuses_connections_is_a_counted_503_not_a_500(
    upstream: FakeOpenAI,
) -> None:
    from prometheus_client import REGISTRY

    def errors() -> float:
        return REGISTRY.get_sample_value("reasoning_agent_database_errors_total") or 0.0

    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"  # nothing listens there
    before = errors()
    env = base_env(upstream, nowhere) | {"REDIS_URL": redis_url(), "TASK_RUNNER": "arq"}
    with running(env, migrate=False) as app, app.client() as client:  # no queue to resume
        for method, path, body in (("POST", "/task", {"prompt": "x"}), ("GET", "/query", None)):
            response = client.request(method, path, json=body)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "database_unavailable"
        assert client.get("/readyz").status_code == 503
    assert errors() == before + 2
