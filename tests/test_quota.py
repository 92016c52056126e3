"""Token limits per key: reserve before the call, settle after, exact under concurrency; the
key's models; GET /usage. Each runs in-process (one worker) and through Redis."""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI, Step
from tests.sse import read_stream
from tests.support import ALICE, BOB, command, redis_url, wait_for

# The PostgreSQL pass runs only the test that reads tokens by model from the database.
agnostic = pytest.mark.database_agnostic

STORES = ["in-process", "redis"]


def store_env(store: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url()} if store == "redis" else {}


def prompt_of(chars: int, tag: str = "") -> str:
    """A prompt of exactly `chars` characters: `chars / 3` tokens in the estimate."""
    return f"{tag} ".ljust(chars, "x")


def usage_of(client: httpx.Client, key: str | None = None) -> dict:
    response = client.get("/usage", params={"key": key} if key else None)
    assert response.status_code == 200, response.text
    return response.json()


def budget_window(usage: dict) -> dict:
    (window,) = [w for w in usage["windows"] if w["kind"] == "token_budget"]
    return window


@pytest.mark.parametrize("store", STORES)
def test_a_reservation_bounds_the_call_and_settles_to_the_reported_usage(
    start_service: StartService, fake_llm: FakeOpenAI, store: str
) -> None:
    service = start_service(TOKEN_BUDGET="5000/day", **store_env(store))
    with service.client() as alice:
        answered = alice.post("/task", json={"prompt": prompt_of(30), "max_tokens": 90})
        assert answered.status_code == 200, answered.text
        task = answered.json()
        assert task["reserved_tokens"] == 100  # ceil(30 / 3) + 90
        assert answered.headers["X-TokenLimit-Limit"] == "5000"
        assert answered.headers["X-TokenLimit-Remaining"] == "4900"  # before it settled
        day_ends = math.ceil(time.time() / 86400) * 86400
        assert int(answered.headers["X-TokenLimit-Reset"]) == day_ends
        assert fake_llm.requests[-1].body["max_tokens"] == 90

        # No max_tokens: DEFAULT_MAX_TOKENS is reserved and sent as the call's limit.
        default = alice.post("/task", json={"prompt": prompt_of(3)}).json()
        assert default["reserved_tokens"] == 1 + 1024 and default["max_tokens"] == 1024
        assert fake_llm.requests[-1].body["max_tokens"] == 1024

        window = budget_window(usage_of(alice))
        reported = task["usage"]["total_tokens"] + default["usage"]["total_tokens"]
        assert reported > 0
        assert (window["used"], window["reserved"]) == (reported, 0)
        assert window["remaining"] == 5000 - reported
        (model,) = usage_of(alice)["models"]
        assert model["model"] == "fake-model" and model["total_tokens"] == reported

        # A call that fails gives its reservation back: nothing reported, nothing charged.
        fake_llm.script(Step(status=500), Step(status=500), Step(status=500))
        failed = alice.post("/task", json={"prompt": prompt_of(30), "max_tokens": 90})
        assert failed.status_code == 502
        window = budget_window(usage_of(alice))
        assert (window["used"], window["reserved"]) == (reported, 0)

        metrics = alice.get("/metrics").text
        assert (
            f'reasoning_agent_tokens_reserved_total{{key="alice"}} {100 + 1025 + 100}.0' in metrics
        )
        assert f'reasoning_agent_tokens_settled_total{{key="alice"}} {reported}.0' in metrics


@agnostic
def test_without_token_limits_nothing_is_reserved_or_sent_as_a_limit(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    service = start_service()
    with service.client() as alice:
        answered = alice.post("/task", json={"prompt": "no limits"})
        assert answered.json()["reserved_tokens"] is None
        assert "X-TokenLimit-Limit" not in answered.headers
        assert "max_tokens" not in fake_llm.requests[-1].body
        assert usage_of(alice)["windows"] == []
        assert usage_of(alice)["models"][0]["tasks"] == 1


@pytest.mark.parametrize("store", STORES)
@agnostic
def test_a_window_without_room_refuses_with_its_type_and_headers(
    start_service: StartService, fake_llm: FakeOpenAI, store: str
) -> None:
    service = start_service(
        TOKEN_RATE_LIMIT="150/minute", TOKEN_BUDGET="1000/day", **store_env(store)
    )
    body = {"prompt": prompt_of(30), "max_tokens": 90}
    fake_llm.default_delay = 0.0
    with service.client() as alice, service.client(BOB) as bob:
        assert [alice.post("/task", json=body).status_code for _ in range(2)] == [200, 200]
        fake_llm.script(Step(delay=3))
        with httpx.Client(base_url=service.base_url, headers={"X-API-Key": ALICE}) as slow:
            holding = threading.Thread(target=slow.post, args=("/task",), kwargs={"json": body})
            holding.start()  # 100 of the minute's 150 held while it runs, 10 used before
            time.sleep(1)
            refused = alice.post("/task", json=body)
            holding.join()
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["type"] == "token_rate_exceeded"
        assert "would reserve 100" in error["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["X-TokenLimit-Limit"] == "150"
        assert int(refused.headers["X-TokenLimit-Remaining"]) < 100
        assert refused.headers["X-RateLimit-Limit"] == "60"  # the request limits, beside
        assert bob.post("/task", json=body).status_code == 200  # bob's windows are his own

        # More than a window can ever hold: refused without a Retry-After that would lie.
        huge = alice.post("/task", json={"prompt": "x", "max_tokens": 5000})
        assert huge.status_code == 429
        assert huge.json()["error"]["type"] == "token_budget_exceeded"
        assert "Retry-After" not in huge.headers
        assert "lower max_tokens" in huge.json()["error"]["message"]

        stored = alice.get("/query", params={"limit": 100}).json()["items"]
        assert len(stored) == 3  # a refused request stores nothing
        metrics = alice.get("/metrics").text
        assert 'reasoning_agent_token_limited_total{key="alice",kind="token_rate"} 1.0' in metrics
        assert 'reasoning_agent_token_limited_total{key="alice",kind="token_budget"} 1.0' in metrics


@pytest.mark.parametrize("store", STORES)
@agnostic
def test_background_tasks_reserve_when_accepted_and_release_on_cancel(
    start_service: StartService, fake_llm: FakeOpenAI, store: str
) -> None:
    # The server runs them itself (no worker process); the reservations are in Redis all the same.
    service = start_service(TOKEN_BUDGET="200/day", TASK_RUNNER="local", **store_env(store))
    body = {"prompt": prompt_of(30), "max_tokens": 90, "mode": "async"}
    fake_llm.script(Step(hang=True), Step(hang=True))
    with service.client() as alice:
        accepted = [alice.post("/task", json=body) for _ in range(3)]
        assert [a.status_code for a in accepted] == [202, 202, 429]  # the queue cannot overspend
        assert accepted[2].json()["error"]["type"] == "token_budget_exceeded"
        first = accepted[0].json()["id"]
        assert alice.delete(f"/task/{first}").json()["status"] == "cancelled"
        assert budget_window(usage_of(alice))["reserved"] == 100  # given back on cancel
        assert alice.post("/task", json=body).status_code == 202
        fake_llm.reset()  # the hung calls end; the tasks fail or finish and settle
        for task in alice.get("/query").json()["items"]:
            wait_for(alice, task["id"], {"completed", "failed", "cancelled"})
        deadline = time.monotonic() + 10
        while budget_window(usage_of(alice))["reserved"] != 0:
            assert time.monotonic() < deadline, usage_of(alice)
            time.sleep(0.1)


@agnostic
def test_a_key_policy_from_the_file_overrides_the_default_and_lists_its_models(
    start_service: StartService, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "keys:\n  bob:\n    token_budget: 300/day\n    models: [fake-model, o4-mini]\n"
    )
    service = start_service(TOKEN_BUDGET="100/day", KEY_POLICIES_FILE=str(policies))
    body = {"prompt": prompt_of(30), "max_tokens": 90}
    with service.client() as alice, service.client(BOB) as bob:
        assert budget_window(usage_of(alice))["limit"] == 100
        assert budget_window(usage_of(bob))["limit"] == 300
        other = bob.post("/task", json={**body, "model": "gpt-4o"})
        assert other.status_code == 403
        assert other.json()["error"]["type"] == "model_not_allowed"
        assert "'gpt-4o'" in other.json()["error"]["message"]
        assert alice.post("/task", json={**body, "model": "gpt-4o"}).status_code == 200
        assert bob.post("/task", json=body).status_code == 200

        # Bob reads only his own; alice (ADMIN_KEYS) may read his.
        assert bob.get("/usage", params={"key": "alice"}).status_code == 403
        assert usage_of(alice, "bob")["key"] == "bob"
        assert budget_window(usage_of(alice, "bob"))["used"] > 0

        staged = tmp_path / "policies.new"  # a ConfigMap update: a new file renamed in place
        staged.write_text("keys:\n  bob:\n    token_budget: 5000/day\n")
        staged.replace(policies)
        deadline = time.monotonic() + 10
        while budget_window(usage_of(bob))["limit"] != 5000:
            assert time.monotonic() < deadline, "the new policy was never applied"
            time.sleep(0.2)
        assert bob.post("/task", json={**body, "model": "gpt-4o"}).status_code == 200

        policies.write_text("keys:\n  bob:\n    token_budget: plenty\n")
        time.sleep(1.5)
        assert budget_window(usage_of(bob))["limit"] == 5000  # the last good policy holds
    assert "KEY_POLICIES_FILE rejected, keeping the last good one" in service.logs()


@agnostic
def test_a_bad_policies_file_refuses_to_start(tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text("keys:\n  team-a:\n    token_budgte: 1/day\n")
    ended = subprocess.run(
        [*command(), "serve"],
        env={
            **os.environ,
            "API_KEYS": f"alice:{ALICE}",
            "KEY_POLICIES_FILE": str(policies),
            "LLM_PROVIDER": "mock",
            "DATABASE_URL": f"sqlite:///{tmp_path}/tasks.db",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ended.returncode == 2, ended.stdout + ended.stderr
    assert "KEY_POLICIES_FILE: keys.team-a.token_budgte: Extra inputs" in ended.stderr
    assert "Traceback" not in ended.stderr


@agnostic
def test_a_streamed_task_settles_like_any_other_and_a_cancelled_one_gives_back(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    service = start_service(TOKEN_BUDGET="5000/day")
    body = {"prompt": prompt_of(30), "max_tokens": 90, "stream": True}
    with service.client() as alice:
        streamed = read_stream(alice, "POST", "/task", json=body)
        assert streamed.headers["X-TokenLimit-Limit"] == "5000"
        done = streamed.events[-1]
        assert done.kind == "done" and done.data["reserved_tokens"] == 100
        reported = done.data["usage"]["total_tokens"]
        window = budget_window(usage_of(alice))
        assert (window["used"], window["reserved"]) == (reported, 0)

        # An upstream that reports no usage is charged the whole reservation.
        fake_llm.script(Step(usage=None))
        silent = read_stream(alice, "POST", "/task", json=body).events[-1]
        assert silent.kind == "done" and silent.data["usage"] is None
        window = budget_window(usage_of(alice))
        assert (window["used"], window["reserved"]) == (reported + 100, 0)

        fake_llm.script(Step(pieces=["slow "] * 50, pause=0.2))
        with httpx.Client(base_url=service.base_url, headers={"X-API-Key": ALICE}) as follower:
            started = read_stream(follower, "POST", "/task", json=body, stop_after=2)
        task_id = started.events[0].data["id"]
        assert budget_window(usage_of(alice))["reserved"] == 100  # still answering
        assert alice.delete(f"/task/{task_id}").json()["status"] == "cancelled"
        window = budget_window(usage_of(alice))
        assert (window["used"], window["reserved"]) == (reported + 100, 0)


@agnostic
def test_a_repeated_idempotency_key_is_charged_once(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    service = start_service(TOKEN_BUDGET="5000/day")
    body = {"prompt": prompt_of(30), "max_tokens": 90}
    with service.client() as alice:
        headers = {"Idempotency-Key": "charge-me-once"}
        first = alice.post("/task", json=body, headers=headers).json()
        again = alice.post("/task", json=body, headers=headers).json()
        assert again["id"] == first["id"] and fake_llm.calls == 1
        window = budget_window(usage_of(alice))
        assert (window["used"], window["reserved"]) == (first["usage"]["total_tokens"], 0)
