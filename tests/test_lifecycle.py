"""Stopping well and dying badly: SIGTERM drains the requests in flight; after SIGKILL nothing
stays pending forever."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI
from tests.support import ALICE, query


def test_sigterm_finishes_the_20_requests_in_flight(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    fake_llm.default_delay = 2.0
    service = start_service(
        WORKERS="2", REDIS_URL="redis://127.0.0.1:6379/15", RATE_LIMIT="1000/minute"
    )
    results: list[int] = []

    async def twenty() -> None:
        async def one(i: int) -> int:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                response = await client.post(
                    "/task", json={"prompt": f"drain {i}"}, headers={"X-API-Key": ALICE}
                )
                return response.status_code

        results.extend(await asyncio.gather(*(one(i) for i in range(20))))

    sender = threading.Thread(target=asyncio.run, args=(twenty(),))
    sender.start()
    deadline = time.monotonic() + 10
    while fake_llm.calls < 20:  # all 20 are waiting on the upstream
        assert time.monotonic() < deadline, f"only {fake_llm.calls} requests reached the upstream"
        time.sleep(0.05)
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:  # no new requests are taken: readiness fails first
        ready = httpx.get(f"{service.base_url}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        ready = None
    assert ready != 200
    sender.join(timeout=30)
    assert results == [200] * 20
    assert service.process.wait(timeout=30) == 0


def test_after_sigkill_a_restart_fails_at_once_the_stale_tasks_and_nothing_else(
    start_service: StartService, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    service = start_service(LLM_TIMEOUT_S="2")
    with service.client() as client:
        done = client.post("/task", json={"prompt": "finished before the crash"}).json()
    fake_llm.default_delay = 30.0
    hung = threading.Thread(target=_swallow, args=(service.base_url,))
    hung.start()
    deadline = time.monotonic() + 10
    while fake_llm.calls < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    service.stop(signal.SIGKILL)
    hung.join(timeout=30)
    statuses = query(service.env["DATABASE_URL"], "SELECT status FROM tasks ORDER BY created_at")
    assert statuses == [("completed",), ("pending",)]

    fake_llm.default_delay = 0.0
    service.restart()  # at once: the dead workers' pids say no one is answering it
    with service.client() as client:
        items = client.get("/query").json()["items"]
    assert [t["status"] for t in items] == ["failed", "completed"]
    assert items[0]["error"] == "interrupted: the service stopped before the answer came"
    assert items[1] == done
    assert "marked 1 interrupted task(s) as failed" in service.logs()


def _swallow(base_url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the service dies under it
        httpx.post(
            f"{base_url}/task",
            json={"prompt": "in flight at the crash"},
            headers={"X-API-Key": ALICE},
            timeout=60,
        )
