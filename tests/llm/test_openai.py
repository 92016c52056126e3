"""The OpenAI provider through a real service: tenacity retries, Retry-After, the deadline, logs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from reasoning_agent.llm import (
    AnswerTooLarge,
    Delta,
    LLMError,
    LLMRequest,
    LLMResult,
    UpstreamError,
    UpstreamUnreachable,
)
from reasoning_agent.llm.openai import OpenAIProvider
from tests.conftest import module_service
from tests.fake_openai import FakeOpenAI, Step
from tests.support import OPENAI_KEY, Service, cyclic_garbage, free_port

TIMEOUT_S = 3
HI = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-test")


def _provider(fake_llm: FakeOpenAI, **options: Any) -> OpenAIProvider:
    """The provider against the fake upstream, one attempt unless `options` say otherwise."""
    given = {"api_key": OPENAI_KEY, "base_url": fake_llm.base_url, "model": "gpt-test"}
    return OpenAIProvider(**{**given, "max_attempts": 1, **options})


async def _ignore(delta: Delta) -> None:
    """A caller that looks at none of a stream's pieces."""


service = module_service(
    "openai",
    LLM_MAX_ATTEMPTS="3",
    LLM_TIMEOUT_S=str(TIMEOUT_S),
    RATE_LIMIT="10000/minute",
)


def attempt_logs(service: Service) -> list[dict]:
    lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "llm attempt"]


def test_429_then_500_then_success_makes_three_calls_and_one_task(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(status=429, headers={"Retry-After": "1"}), Step(status=500))
    before = len(attempt_logs(service))
    with service.client() as client:
        response = client.post("/task", json={"prompt": "retry me"})
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["status"] == "completed" and task["attempts"] == 3
        assert task["answer"] == "fake answer to: retry me"
        assert fake_llm.calls == 3
        gap = fake_llm.requests[1].at - fake_llm.requests[0].at
        assert gap >= 0.95, f"Retry-After: 1 was not honoured ({gap:.2f}s)"
        matching = client.get("/query", params={"q": "retry me"}).json()["items"]
        assert [t["id"] for t in matching] == [task["id"]]
    logged = attempt_logs(service)[before:]
    assert [(line["attempt"], line["outcome"]) for line in logged] == [
        (1, "http_429"),
        (2, "http_500"),
        (3, "ok"),
    ]
    assert all(line["duration_ms"] >= 0 and line["provider"] == "openai" for line in logged)


def test_attempts_exhausted_gives_502_and_a_failed_task(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(status=503), Step(status=502), Step(status=500), Step(status=500))
    with service.client() as client:
        response = client.post("/task", json={"prompt": "always failing"})
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["type"] == "upstream_error"
        assert error["message"] == "upstream answered HTTP 500 after 3 attempts"
        assert fake_llm.calls == 3
        task = client.get(f"/task/{error['task_id']}").json()
        assert task["status"] == "failed" and task["attempts"] == 3
        assert task["error"] == error["message"] and task["answer"] is None
        assert client.post("/task", json={"prompt": "works again"}).status_code == 200


def test_a_refusal_is_not_retried(service: Service, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(status=401))
    with service.client() as client:
        response = client.post("/task", json={"prompt": "bad upstream key"})
        assert response.status_code == 502
        assert fake_llm.calls == 1
        assert OPENAI_KEY not in response.text


@pytest.mark.parametrize("step", [Step(hang=True), Step(delay=TIMEOUT_S + 2)], ids=["hung", "slow"])
def test_the_deadline_gives_504_and_a_failed_task(
    service: Service, fake_llm: FakeOpenAI, step: Step
) -> None:
    fake_llm.script(step)
    with service.client() as client:
        started = time.monotonic()
        response = client.post("/task", json={"prompt": "too slow"})
        elapsed = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert TIMEOUT_S - 0.2 <= elapsed < TIMEOUT_S + 1.5
        error = response.json()["error"]
        assert error["type"] == "deadline_exceeded"
        task = client.get(f"/task/{error['task_id']}").json()
        assert task["status"] == "failed" and task["error"] == error["message"]
        assert task["latency_ms"] >= (TIMEOUT_S - 0.2) * 1000
        assert client.post("/task", json={"prompt": "next one"}).status_code == 200


def test_retry_after_past_the_deadline_stops_at_once(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(status=429, headers={"Retry-After": "30"}))
    with service.client() as client:
        started = time.monotonic()
        response = client.post("/task", json={"prompt": "come back later"})
        assert time.monotonic() - started < 1.5
        assert response.status_code == 502
        assert response.json()["error"]["message"] == "upstream answered HTTP 429 after 1 attempt"
        assert fake_llm.calls == 1


def test_a_slow_but_timely_answer_is_kept(service: Service, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(delay=1.0))
    with service.client() as client:
        task = client.post("/task", json={"prompt": "take your time"}).json()
        assert task["status"] == "completed" and task["latency_ms"] >= 1000


def test_the_sdk_does_not_retry_by_itself(service: Service, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(status=500), Step(status=500), Step(status=500))
    with service.client() as client:
        assert client.post("/task", json={"prompt": "count calls"}).status_code == 502
    assert fake_llm.calls == 3  # LLM_MAX_ATTEMPTS, not 3 x the SDK's own 2 retries
    assert {r.headers.get("x-stainless-retry-count") for r in fake_llm.requests} <= {"0", None}


def test_a_call_leaves_nothing_for_the_cyclic_collector(fake_llm: FakeOpenAI) -> None:
    """Reference counting must free each call's retry state: a cycle a task made the
    collector stop a worker for 8 ms every ~550 tasks (bench/README.md)."""
    provider = OpenAIProvider(
        api_key=OPENAI_KEY, base_url=fake_llm.base_url, model="gpt-test", max_attempts=3
    )
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-test")

    async def calls(n: int) -> None:
        for _ in range(n):
            result = await provider.complete(request, deadline=time.monotonic() + 10)
            assert result.answer == "fake answer to: hi" and result.attempts == 1

    async def main() -> list[str]:
        await calls(3)  # first-call imports, the connection pool
        try:
            # The client's stack, not the fake upstream serving in a thread of this process.
            with cyclic_garbage("tenacity", "reasoning_agent", "openai", "aiohttp") as found:
                await calls(20)
            return found
        finally:
            await provider.aclose()

    assert asyncio.run(main()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "1e400", "soon"])
def test_a_retry_after_that_is_no_sane_wait_is_treated_as_absent(
    fake_llm: FakeOpenAI, value: str
) -> None:
    """Not a finite, non-negative number of seconds: backoff instead, never past the deadline."""
    provider = OpenAIProvider(
        api_key=OPENAI_KEY, base_url=fake_llm.base_url, model="gpt-test", max_attempts=3
    )
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-test")
    fake_llm.script(Step(status=429, headers={"Retry-After": value}))

    async def call() -> float:
        started = time.monotonic()
        try:
            result = await provider.complete(request, deadline=started + TIMEOUT_S)
        finally:
            await provider.aclose()
        assert result.answer == "fake answer to: hi" and result.attempts == 2
        return time.monotonic() - started

    assert asyncio.run(call()) < TIMEOUT_S


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_answer_past_the_byte_cap_is_not_read_whole_and_fails_the_call(
    fake_llm: FakeOpenAI, chunked: bool, streamed: bool
) -> None:
    """Streamed too: one endless event is cut off at the cap, not buffered to its end."""
    cap = 1_000_000
    huge = b'{"choices": [{"message": {"content": "' + b"x" * (5 * cap) + b'"}}]}'
    if streamed:
        huge = b'data: {"choices": [{"delta": {"content": "' + b"x" * (5 * cap) + b'"}}]}'
    provider = _provider(fake_llm, max_attempts=3, max_response_bytes=cap)

    async def call() -> LLMResult:
        deadline = time.monotonic() + 10
        if streamed:
            return await provider.stream(HI, deadline=deadline, on_delta=_ignore)
        return await provider.complete(HI, deadline=deadline)

    async def main() -> LLMError:
        fake_llm.script(Step(raw=huge, chunked=chunked))
        try:
            with pytest.raises(AnswerTooLarge) as caught:
                await call()
            # the connection is not left half read: the next call gets a normal answer
            assert (await call()).answer == "fake answer to: hi"
        finally:
            await provider.aclose()
        return caught.value

    error = asyncio.run(main())
    assert error.attempts == 1 and error.outcome == "too_large"
    assert str(error) == f"upstream answer is larger than {cap} bytes (LLM_MAX_RESPONSE_BYTES)"
    assert fake_llm.calls == 2  # not retried


def test_a_long_stream_of_small_events_is_not_cut_by_the_byte_cap(fake_llm: FakeOpenAI) -> None:
    """The cap bounds the text and each event, not the stream's envelopes summed."""
    fake_llm.script(Step(pieces=["x"] * 1000))  # ~150 KB of events for 1000 characters
    provider = _provider(fake_llm, max_response_bytes=20_000)

    async def main() -> LLMResult:
        try:
            return await provider.stream(HI, deadline=time.monotonic() + 10, on_delta=_ignore)
        finally:
            await provider.aclose()

    assert asyncio.run(main()).answer == "x" * 1000


@pytest.mark.parametrize(
    "base_url",
    ["http://no-such-upstream.invalid:9/v1", f"http://127.0.0.1:{free_port()}/v1"],
    ids=["a name that does not resolve", "a refused connection"],
)
def test_an_upstream_that_cannot_be_reached_is_a_connection_error_not_a_timeout(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK reports both as a connect timeout; the cause says otherwise, and the task,
    the attempt log and the attempt metric say connection_error."""
    provider = OpenAIProvider(api_key=OPENAI_KEY, base_url=base_url, model="m", max_attempts=2)
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="m")

    async def call() -> LLMError:
        try:
            with pytest.raises(UpstreamUnreachable) as caught:
                await provider.complete(request, deadline=time.monotonic() + 30)
        finally:
            await provider.aclose()
        return caught.value

    with caplog.at_level("INFO", logger="reasoning_agent.llm.openai"):
        error = asyncio.run(call())
    assert str(error) == "upstream unreachable after 2 attempts" and error.attempts == 2
    assert error.code == "connection_error" and error.outcome == "connection_error"
    outcomes = [r.outcome for r in caplog.records if r.getMessage() == "llm attempt"]
    assert outcomes == ["connection_error"] * 2


def test_a_reasoning_model_gets_max_completion_tokens_and_no_temperature(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    asked = {"temperature": 0.5, "max_tokens": 100, "reasoning_effort": "high"}
    with service.client() as client:
        task = client.post("/task", json={"prompt": "think", "model": "o4-mini", **asked}).json()
    sent = fake_llm.requests[-1].body
    assert sent["model"] == "o4-mini"
    assert sent["max_completion_tokens"] == 100 and "max_tokens" not in sent
    assert "temperature" not in sent and sent["reasoning_effort"] == "high"
    assert task["dropped_params"] == ["temperature"]
    assert task["temperature"] == 0.5 and task["reasoning_effort"] == "high"  # as asked


def test_other_models_get_what_they_asked_for(service: Service, fake_llm: FakeOpenAI) -> None:
    asked = {"temperature": 0.5, "max_tokens": 100, "reasoning_effort": "low"}
    with service.client() as client:
        task = client.post("/task", json={"prompt": "plain", "model": "gpt-4o", **asked}).json()
    sent = fake_llm.requests[-1].body
    assert (sent["temperature"], sent["max_tokens"], sent["reasoning_effort"]) == (0.5, 100, "low")
    assert "max_completion_tokens" not in sent and task["dropped_params"] == []


def test_reasoning_text_and_tokens_are_kept_apart_from_the_answer(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    message = {"role": "assistant", "content": "42", "reasoning_content": "6 times 7"}
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 30,
        "total_tokens": 40,
        "completion_tokens_details": {"reasoning_tokens": 25},
    }
    fake_llm.script(Step(body={"choices": [{"message": message}], "usage": usage}))
    with service.client() as client:
        task = client.post("/task", json={"prompt": "reason", "model": "deepseek-r1"}).json()
        again = client.get(f"/task/{task['id']}").json()
    for shown in (task, again):
        assert shown["answer"] == "42" and shown["reasoning"] == "6 times 7"
        assert shown["usage"] == {
            "prompt_tokens": 10,
            "completion_tokens": 30,
            "total_tokens": 40,  # the reasoning tokens are in the completion already
            "reasoning_tokens": 25,
        }
    with service.client() as client:  # alice reads /metrics
        metrics = client.get("/metrics").text
    assert 'reasoning_agent_llm_tokens_total{direction="reasoning",key="alice"} 25.0' in metrics


@pytest.mark.parametrize(
    ("limit", "streamed"), [(2, 0), (4, 0), (2, 2), (2, 4)], ids=lambda v: str(v)
)
def test_calls_past_the_connection_limit_wait_for_one_to_end(
    fake_llm: FakeOpenAI, limit: int, streamed: int
) -> None:
    """One limit for every call, streamed (`streamed` of the four) or not."""
    fake_llm.default_delay = 0.5
    provider = _provider(fake_llm, max_connections=limit)

    async def main() -> None:
        try:
            deadline = time.monotonic() + 10
            calls = [
                provider.stream(HI, deadline=deadline, on_delta=_ignore)
                if n < streamed
                else provider.complete(HI, deadline=deadline)
                for n in range(4)
            ]
            results = await asyncio.gather(*calls)
            assert all(r.answer == "fake answer to: hi" for r in results)
        finally:
            await provider.aclose()

    asyncio.run(main())
    arrived = sorted(r.at - fake_llm.requests[0].at for r in fake_llm.requests)
    assert len(arrived) == 4
    assert max(arrived[:limit]) < 0.3, arrived  # all within the limit at once
    assert all(t >= 0.4 for t in arrived[limit:]), arrived  # the rest after one ended


def _complete_once(fake_llm: FakeOpenAI, request: LLMRequest) -> LLMResult:
    provider = _provider(fake_llm)

    async def call() -> LLMResult:
        try:
            return await provider.complete(request, deadline=time.monotonic() + 10)
        finally:
            await provider.aclose()

    return asyncio.run(call())


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_the_upstream_sees_what_the_sdk_would_send(fake_llm: FakeOpenAI, streamed: bool) -> None:
    """The calls skip the SDK's request building: the same key, identity and JSON still
    arrive."""
    messages = [{"role": "user", "content": "héllo, 東京"}]
    request = LLMRequest(messages=messages, model="gpt-test", temperature=0.5, max_tokens=7)
    provider = _provider(fake_llm)
    pieces: list[str] = []

    async def keep(delta: Delta) -> None:
        pieces.append(delta.text)

    async def call() -> LLMResult:
        deadline = time.monotonic() + 10
        try:
            if streamed:
                return await provider.stream(request, deadline=deadline, on_delta=keep)
            return await provider.complete(request, deadline=deadline)
        finally:
            await provider.aclose()

    assert asyncio.run(call()).answer == "fake answer to: héllo, 東京"
    assert "".join(pieces) == ("fake answer to: héllo, 東京" if streamed else "")
    received = fake_llm.requests[-1]
    assert received.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["user-agent"].startswith("AsyncOpenAI/Python ")
    assert received.headers["x-stainless-lang"] == "python"
    sent = {"model": "gpt-test", "messages": messages, "temperature": 0.5, "max_tokens": 7}
    if streamed:
        sent |= {"stream": True, "stream_options": {"include_usage": True}}
    assert received.body == sent


def test_a_redirect_is_not_followed_but_fails_the_call(fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(status=307, headers={"Location": f"{fake_llm.base_url}/elsewhere"}))
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-test")
    with pytest.raises(UpstreamError) as caught:
        _complete_once(fake_llm, request)
    assert str(caught.value) == "upstream answered HTTP 307 after 1 attempt"
    assert fake_llm.calls == 1


def test_the_proxy_variables_apply_to_every_call(
    fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY reaches the streamed and the non-streamed call alike: the fake upstream
    stands in as the proxy for a host that does not resolve."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{fake_llm.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    provider = _provider(fake_llm, base_url="http://upstream.invalid/v1")

    async def main() -> list[LLMResult]:
        try:
            deadline = time.monotonic() + 10
            return [
                await provider.complete(HI, deadline=deadline),
                await provider.stream(HI, deadline=deadline, on_delta=_ignore),
            ]
        finally:
            await provider.aclose()

    assert [r.answer for r in asyncio.run(main())] == ["fake answer to: hi"] * 2
    assert [r.headers["host"] for r in fake_llm.requests] == ["upstream.invalid"] * 2


def test_no_proxy_exempts_the_upstream(
    fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-test")
    assert _complete_once(fake_llm, request).answer == "fake answer to: hi"
