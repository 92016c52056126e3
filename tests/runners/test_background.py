"""Background tasks: 202 and polling, cancelling, resuming after a crash, and arq workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI, Step
from tests.sse import deltas, read_stream
from tests.support import Service, command, query, redis_url, wait_for


def test_async_mode_answers_202_and_the_task_completes(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    fake_llm.default_delay = 0.5
    service = start_service()
    with service.client() as client:
        response = client.post("/task", json={"prompt": "think slowly", "mode": "async"})
        assert response.status_code == 202
        task = response.json()
        assert task["status"] in ("queued", "running") and task["answer"] is None
        assert response.headers["Location"] == f"/task/{task['id']}"
        done = wait_for(client, task["id"], {"completed"})
        assert done["answer"] == "fake answer to: think slowly" and done["attempts"] == 1

        preferred = client.post(
            "/task", json={"prompt": "prefer"}, headers={"Prefer": "respond-async"}
        )
        assert preferred.status_code == 202
        assert preferred.headers["Preference-Applied"] == "respond-async"
        assert wait_for(client, preferred.json()["id"], {"completed"})["status"] == "completed"
        metrics = client.get("/metrics").text  # background calls count like any other
        calls = 'reasoning_agent_llm_calls_total{model="fake-model",outcome="ok",provider="openai"}'
        assert f"{calls} 2.0" in metrics
        assert 'reasoning_agent_tasks_total{status="completed"} 2.0' in metrics
        assert 'reasoning_agent_llm_tokens_total{direction="output",key="alice"}' in metrics


def test_cancel_a_queued_and_a_running_task(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    fake_llm.default_delay = 3.0
    service = start_service(WORKER_CONCURRENCY="1")
    with service.client() as client:
        running = client.post("/task", json={"prompt": "first", "mode": "async"}).json()
        queued = client.post("/task", json={"prompt": "second", "mode": "async"}).json()
        wait_for(client, running["id"], {"running"})
        assert client.get(f"/task/{queued['id']}").json()["status"] == "queued"

        cancelled = client.delete(f"/task/{queued['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        stopped = client.delete(f"/task/{running['id']}").json()
        assert stopped["status"] == "cancelled" and stopped["error"] == "cancelled by the caller"

        time.sleep(3.5)  # past the upstream's delay: nothing overwrites the cancellation
        for task_id in (running["id"], queued["id"]):
            assert client.get(f"/task/{task_id}").json()["status"] == "cancelled"
        assert [r.body["messages"][-1]["content"] for r in fake_llm.requests] == ["first"]

        again = client.delete(f"/task/{running['id']}")
        assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
        assert client.delete("/task/0123456789abcdef0123456789abcdef").status_code == 404
        done = client.post("/task", json={"prompt": "sync"}).json()
        assert client.delete(f"/task/{done['id']}").status_code == 409


def test_after_sigkill_a_restart_runs_at_once_what_its_processes_held(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    """The killed workers' pids are gone: their running task is queued again without waiting
    out its lease, and runs a second time beside the queued one."""
    fake_llm.script(Step(hang=True))
    service = start_service(WORKER_CONCURRENCY="1", LLM_TIMEOUT_S="20")
    with service.client() as client:
        running, queued = (
            client.post("/task", json={"prompt": f"resume {i}", "mode": "async"}).json()["id"]
            for i in range(2)
        )
        wait_for(client, running, {"running"})
    service.stop(signal.SIGKILL)
    fake_llm.reset()
    service.restart()
    with service.client() as client:
        for task_id in (queued, running):  # well inside the 30 s lease
            assert wait_for(client, task_id, {"completed", "failed"}, timeout=15)["status"] == (
                "completed"
            )
    tries = query(service.env["DATABASE_URL"], f"SELECT tries FROM tasks WHERE id = '{running}'")
    assert tries == [(2,)]
    assert "resumed background tasks" in service.logs()


def test_a_task_that_waited_in_the_queue_is_not_swept_while_it_runs(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    """Six tasks one at a time outlast the deadline from the first one's submission; each is
    leased while it runs, so none is taken for interrupted."""
    fake_llm.default_delay = 1.6
    service = start_service(WORKER_CONCURRENCY="1", LLM_TIMEOUT_S="2")
    with service.client() as client:
        ids = [
            client.post("/task", json={"prompt": f"in line {i}", "mode": "async"}).json()["id"]
            for i in range(6)
        ]
        finished = [wait_for(client, task_id, {"completed", "failed"}) for task_id in ids]
    assert [task["status"] for task in finished] == ["completed"] * 6
    assert fake_llm.calls == 6


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    workers: list[subprocess.Popen[bytes]] = []

    def start(service: Service) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(workers)}.log").open("ab")
        process = subprocess.Popen(
            [*command(), "worker"],
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.append(process)
        return process

    yield start
    for process in workers:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def test_arq_workers_run_tasks_and_a_killed_worker_is_retried(
    start_service: StartService, fake_llm: FakeOpenAI, start_worker: Callable, tmp_path: Path
) -> None:
    service = start_service(REDIS_URL=redis_url(), LLM_TIMEOUT_S="2")
    worker = start_worker(service)
    with service.client() as client:
        first = client.post("/task", json={"prompt": "via arq", "mode": "async"}).json()
        assert wait_for(client, first["id"], {"completed"})["answer"] == "fake answer to: via arq"

        fake_llm.default_delay = 1.5
        doomed = client.post("/task", json={"prompt": "outlive the worker", "mode": "async"}).json()
        wait_for(client, doomed["id"], {"running"})
        deadline = time.monotonic() + 10
        while "outlive the worker" not in [
            r.body["messages"][-1]["content"] for r in fake_llm.requests
        ]:
            assert time.monotonic() < deadline, "the worker never called the upstream"
            time.sleep(0.05)  # killed after its call is out, not between its claim and the call
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        fake_llm.default_delay = 0.0
        start_worker(service)
        # arq hands the job out again once the dead worker's claim expires (job timeout + 10 s).
        retried = wait_for(client, doomed["id"], {"completed", "failed"}, timeout=60)
        assert retried["status"] == "completed"
        assert [r.body["messages"][-1]["content"] for r in fake_llm.requests].count(
            "outlive the worker"
        ) == 2


def test_a_queued_task_whose_job_vanished_from_redis_is_enqueued_again(
    start_service: StartService, fake_llm: FakeOpenAI, start_worker: Callable
) -> None:
    """The chart's Redis keeps nothing on disk: a restart or an eviction loses queued jobs.
    The row outlives them, and the sweep gives a due one whose job is gone to the queue."""
    import redis

    from reasoning_agent.runners.arq import QUEUE

    url = redis_url()
    service = start_service(REDIS_URL=url)
    with service.client() as client:
        task_id = client.post("/task", json={"prompt": "lost job", "mode": "async"}).json()["id"]
    store = redis.Redis.from_url(url)
    try:
        assert store.delete(f"arq:job:{task_id}") == 1  # as an eviction or a restart would
        store.zrem(QUEUE, task_id)
    finally:
        store.close()
    database = service.env["DATABASE_URL"]
    query(database, f"UPDATE tasks SET lease_until = created_at WHERE id = '{task_id}'")  # due
    start_worker(service)  # its first sweep runs at start
    with service.client() as client:
        done = wait_for(client, task_id, {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed" and done["answer"] == "fake answer to: lost job"


def test_arq_cancel_stops_the_running_job(
    start_service: StartService, fake_llm: FakeOpenAI, start_worker: Callable
) -> None:
    fake_llm.default_delay = 3.0
    service = start_service(REDIS_URL=redis_url(), LLM_TIMEOUT_S="10")
    start_worker(service)
    with service.client() as client:
        task = client.post("/task", json={"prompt": "stop me", "mode": "async"}).json()
        wait_for(client, task["id"], {"running"})
        assert client.delete(f"/task/{task['id']}").json()["status"] == "cancelled"
        time.sleep(3.5)
        assert client.get(f"/task/{task['id']}").json()["status"] == "cancelled"


class _RunsCode:
    """Unpickled, it runs a shell command: what anyone who can write to Redis could enqueue."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_a_pickle_in_redis_is_never_unpickled_by_a_worker_or_a_cancel(
    start_service: StartService, fake_llm: FakeOpenAI, start_worker: Callable, tmp_path: Path
) -> None:
    import pickle

    import redis
    from arq import create_pool
    from arq.connections import RedisSettings

    from reasoning_agent.runners.arq import QUEUE

    url = redis_url()
    service = start_service(REDIS_URL=url, LLM_TIMEOUT_S="5")
    marker = tmp_path / "ran"
    with service.client() as client:
        queued = client.post("/task", json={"prompt": "cancel me", "mode": "async"}).json()
        # What a cancel reads back from Redis: the job's result, here a pickle that runs code.
        store = redis.Redis.from_url(url)
        store.set(f"arq:result:{queued['id']}", pickle.dumps(_RunsCode(f"touch {marker}")))
        store.close()
        cancelled = client.delete(f"/task/{queued['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    async def enqueue_a_pickle() -> None:
        pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=QUEUE)
        try:  # arq's default serializer is pickle
            await pool.enqueue_job("run_task", _RunsCode(f"touch {marker}"), _job_id="evil")
        finally:
            await pool.aclose()

    asyncio.run(enqueue_a_pickle())
    start_worker(service)
    with service.client() as client:  # the worker drops the pickle and goes on with real tasks
        task = client.post("/task", json={"prompt": "after the pickle", "mode": "async"}).json()
        assert wait_for(client, task["id"], {"completed", "failed"})["status"] == "completed"
    assert not marker.exists()


def test_the_workers_liveness_check_follows_its_loop_and_redis(
    start_service: StartService, start_worker: Callable, tmp_path: Path
) -> None:
    heartbeat = tmp_path / "worker.alive"
    service = start_service(REDIS_URL=redis_url(), WORKER_HEARTBEAT_FILE=str(heartbeat))

    def check(max_age: float) -> int:
        args = [*command(), "worker", "--check", "--max-age", str(max_age)]
        return subprocess.run(args, env=service.env, check=False, timeout=60).returncode

    assert check(30) == 1  # no worker yet
    worker = start_worker(service)
    deadline = time.monotonic() + 30
    while not heartbeat.exists():
        assert time.monotonic() < deadline, "the worker never beat"
        time.sleep(0.1)
    assert check(30) == 0
    os.killpg(worker.pid, signal.SIGSTOP)  # a hung worker: its loop no longer turns
    try:
        time.sleep(3)
        assert check(2) == 1
        stopped_at = heartbeat.stat().st_mtime
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while heartbeat.stat().st_mtime == stopped_at:  # it beats again once it runs
        assert time.monotonic() < deadline, "the worker did not beat again"
        time.sleep(0.1)
    assert check(30) == 0


def test_sigterm_lets_running_tasks_finish_and_queues_again_what_cannot(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    """A rollout of the default chart (SQLite, in-process runner) fails nothing it was running."""
    fake_llm.script(Step(delay=1.0), Step(delay=8.0))  # one ends within the drain, one not
    service = start_service(WORKER_CONCURRENCY="2", LLM_TIMEOUT_S="20", BACKGROUND_DRAIN_S="3")
    with service.client() as client:
        quick = client.post("/task", json={"prompt": "quick", "mode": "async"}).json()["id"]
        wait_for(client, quick, {"running"})
        slow = client.post("/task", json={"prompt": "slow", "mode": "async"}).json()["id"]
        wait_for(client, slow, {"running"})
    assert service.stop(signal.SIGTERM) == 0
    url = service.env["DATABASE_URL"]
    statuses = dict(query(url, f"SELECT id, status FROM tasks WHERE id IN ('{quick}', '{slow}')"))
    assert statuses == {quick: "completed", slow: "queued"}
    assert "background tasks queued again" in service.logs()

    fake_llm.reset()
    service.restart()  # the next process runs what was queued again
    with service.client() as client:
        assert wait_for(client, slow, {"completed", "failed"})["status"] == "completed"


def test_tasks_on_one_replica_or_a_worker_are_followed_from_another(
    start_service: StartService, fake_llm: FakeOpenAI, start_worker: Callable
) -> None:
    """Two replicas and an arq worker on one Redis: a client of the second follows, piece by
    piece, a task streamed by the first and a background task the worker runs."""
    env = {"REDIS_URL": redis_url(), "LLM_TIMEOUT_S": "10"}
    first, second = start_service(**env), start_service(**env)
    start_worker(first)
    words = [f"w{i} " for i in range(8)]
    fake_llm.script(Step(pieces=words, pause=0.15), Step(pieces=words, pause=0.15))
    with first.client() as one, second.client() as other:
        streamed = read_stream(
            one, "POST", "/task", json={"prompt": "here", "stream": True}, stop_after=2
        )
        task_id = streamed.events[0].data["id"]
        followed = read_stream(other, "GET", f"/task/{task_id}/events")
        queued = one.post("/task", json={"prompt": "there", "mode": "async"}).json()
        background = read_stream(other, "GET", f"/task/{queued['id']}/events")
    for stream in (followed, background):
        assert [e.id for e in stream.events] == list(range(1, len(stream.events) + 1))
        assert stream.events[0].kind == "task" and stream.events[-1].kind == "done"
        assert deltas(stream) == "".join(words) == stream.events[-1].data["answer"]
        assert sum(e.kind == "delta" for e in stream.events) == len(words)  # piece by piece


def test_a_stream_cancelled_through_another_replica_stops_where_it_runs(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    env = {"REDIS_URL": redis_url(), "LLM_TIMEOUT_S": "40"}
    first, second = start_service(**env), start_service(**env)
    words = [f"w{i} " for i in range(100)]
    fake_llm.script(Step(pieces=words, pause=0.2))  # 20 s of answer
    with first.client() as one, second.client() as other:
        streamed = read_stream(
            one, "POST", "/task", json={"prompt": "stop it", "stream": True}, stop_after=2
        )
        task_id = streamed.events[0].data["id"]
        asked = time.monotonic()
        cancelled = other.delete(f"/task/{task_id}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        rest = read_stream(other, "GET", f"/task/{task_id}/events", headers={"Last-Event-ID": "2"})
        stopped_after = time.monotonic() - asked
        stored = other.get(f"/task/{task_id}").json()
    assert rest.events[-1].kind == "done" and rest.events[-1].data["status"] == "cancelled"
    assert stopped_after < 13, stopped_after  # the next lease renewal, every 10 s
    assert len(deltas(streamed) + deltas(rest)) < len("".join(words))
    assert stored["status"] == "cancelled"  # not overwritten by the answer's end


def test_an_arq_worker_settles_the_reservation_its_task_was_accepted_with(
    start_service: StartService, fake_llm: FakeOpenAI, start_worker: Callable
) -> None:
    """The reservation is made by the server that accepts the task, in Redis; the worker
    process that runs it settles it there."""
    service = start_service(REDIS_URL=redis_url(), TOKEN_BUDGET="5000/day")
    with service.client() as client:
        body = {"prompt": "settled elsewhere", "max_tokens": 90, "mode": "async"}
        accepted = client.post("/task", json=body)
        assert accepted.status_code == 202
        assert accepted.json()["reserved_tokens"] == 6 + 90  # ceil(17 / 3) + 90
        (window,) = client.get("/usage").json()["windows"]
        assert window["reserved"] == 96  # held while it waits for a worker
        start_worker(service)
        done = wait_for(client, accepted.json()["id"], {"completed"})
        deadline = time.monotonic() + 10  # it settles just after the row is stored
        while (window := client.get("/usage").json()["windows"][0])["reserved"]:
            assert time.monotonic() < deadline, window
            time.sleep(0.1)
        assert (window["used"], window["reserved"]) == (done["usage"]["total_tokens"], 0)
