"""The task service in this process, on the real database and the fake upstream: what a
submission becomes, background runs through the same service, and how failures are classified."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from reasoning_agent.errors import (
    BadGateway,
    GatewayTimeout,
    ServiceUnavailable,
    for_error_type,
    for_llm_error,
)
from reasoning_agent.errors import UpstreamUnreachable as ErrorsUnreachable
from reasoning_agent.llm import (
    DeadlineExceeded,
    LLMError,
    MalformedAnswer,
    NoAnswer,
    NotConfigured,
    UpstreamError,
    UpstreamUnreachable,
)
from reasoning_agent.tasks.leases import MAX_TRIES
from reasoning_agent.tasks.schemas import TaskIn
from reasoning_agent.tasks.service import TaskService, Verdict
from reasoning_agent.tasks.status import ErrorType, TaskStatus
from tests.conftest import base_env
from tests.fake_openai import FakeOpenAI, Step
from tests.inprocess import InProcessApp, running
from tests.support import (
    OwnPostgres,
    drop_database,
    free_port,
    new_database,
    query,
    redis_url,
)
from tests.tasks.factories import new_task


def tasks_of(app: InProcessApp) -> TaskService:
    service: TaskService = app.services.tasks
    return service


def test_a_sync_submission_is_completed_and_stored_as_answered(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    prompt = f"service {uuid.uuid4().hex}"
    submitted = shared_app.run(
        lambda: tasks_of(shared_app).submit(TaskIn(prompt=prompt), owner="alice", background=False)
    )
    assert submitted.verdict == Verdict.COMPLETED
    task = submitted.task
    assert task.status is TaskStatus.COMPLETED and task.answer == f"fake answer to: {prompt}"
    stored = shared_app.run(lambda: tasks_of(shared_app).get("alice", task.id))
    assert stored.status is TaskStatus.COMPLETED  # the enum itself, read back from the row
    assert stored.answer == task.answer and stored.attempts == 1


def test_a_repeated_idempotency_key_is_replayed_without_a_second_call(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    key, body = uuid.uuid4().hex, TaskIn(prompt=f"replay {uuid.uuid4().hex}")

    async def twice() -> list[Verdict]:
        service = tasks_of(shared_app)
        first = await service.submit(body, owner="alice", background=False, idempotency_key=key)
        again = await service.submit(body, owner="alice", background=False, idempotency_key=key)
        assert again.task.id == first.task.id
        return [first.verdict, again.verdict]

    assert shared_app.run(twice) == [Verdict.COMPLETED, Verdict.REPLAYED]
    assert fake_llm.calls == 1


def test_a_background_task_is_run_by_the_same_service_and_a_cancelled_one_is_never_asked(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    service = tasks_of(shared_app)
    prompt = f"background {uuid.uuid4().hex}"
    accepted = shared_app.run(
        lambda: service.submit(TaskIn(prompt=prompt), owner="alice", background=True)
    )
    assert accepted.verdict == Verdict.ACCEPTED and accepted.task.status == TaskStatus.QUEUED
    deadline = time.monotonic() + 10
    while (task := shared_app.run(lambda: service.get("alice", accepted.task.id))).status in (
        TaskStatus.QUEUED,
        TaskStatus.RUNNING,
    ):
        assert time.monotonic() < deadline, task.status
        time.sleep(0.05)
    assert task.status is TaskStatus.COMPLETED and task.answer == f"fake answer to: {prompt}"

    async def cancelled_then_run() -> TaskStatus:
        queued, _ = await new_task(
            service.repository, prompt="never asked", status=TaskStatus.QUEUED
        )
        await service.cancel("alice", queued.id)
        await service.run(queued.id)  # as a runner that took it before the cancellation would
        return (await service.get("alice", queued.id)).status

    calls = fake_llm.calls
    assert shared_app.run(cancelled_then_run) is TaskStatus.CANCELLED
    assert fake_llm.calls == calls


@pytest.fixture
def queue_away(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[tuple[InProcessApp, str]]:
    """The app and its database URL, with its arq queue on a port where nothing listens."""
    url = new_database(tmp_path)
    env = base_env(upstream, url) | {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "TASK_RUNNER": "arq",
        "RATE_LIMIT_ON_STORE_ERROR": "allow",
    }
    try:
        with running(env) as app:
            yield app, url
    finally:
        drop_database(url)


def test_a_queue_that_cannot_be_reached_answers_503_and_the_task_is_failed_not_lost(
    queue_away: tuple[InProcessApp, str],
) -> None:
    app, url = queue_away
    with app.client() as client:
        response = client.post("/task", json={"prompt": "queued nowhere", "mode": "async"})
    assert response.status_code == 503, response.text
    assert response.json()["error"] == {
        "type": "unavailable",
        "message": "the task queue is unavailable",
    }
    assert query(url, "SELECT status, error_type FROM tasks") == [("failed", "unavailable")]


def test_cancelling_while_the_queue_is_unreachable_answers_with_the_cancelled_task(
    queue_away: tuple[InProcessApp, str],
) -> None:
    """The row is cancelled first; a job that runs later finds it cancelled and stops."""
    app, url = queue_away
    queued, _ = app.run(lambda: new_task(tasks_of(app).repository, status=TaskStatus.QUEUED))
    with app.client() as client:
        response = client.delete(f"/task/{queued.id}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert query(url, "SELECT status FROM tasks") == [("cancelled",)]


def test_the_sweep_enqueues_lost_jobs_again_and_fails_those_out_of_tries(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """Due queued tasks are looked for in Redis: a live job is left to run, a lost one is
    enqueued again, and one that has used its tries fails rather than loop forever."""
    import redis

    url = new_database(tmp_path)
    env = base_env(upstream, url) | {"REDIS_URL": redis_url(), "TASK_RUNNER": "arq"}
    store = redis.Redis.from_url(env["REDIS_URL"])
    try:
        with running(env) as app:
            service = tasks_of(app)

            async def store_three() -> dict[str, str]:
                ids = {}
                for prompt in ("waiting", "lost", "spent"):
                    task, _ = await new_task(
                        service.repository, prompt=prompt, status=TaskStatus.QUEUED
                    )
                    ids[prompt] = task.id
                await service.runner.submit(ids["waiting"])  # its job is in Redis
                return ids

            ids = app.run(store_three)
            query(url, "UPDATE tasks SET lease_until = created_at")  # all due for a look
            query(url, f"UPDATE tasks SET tries = {MAX_TRIES} WHERE prompt = 'spent'")
            app.run(service.sweep)  # (the app's own sweep at start may get there first)
            live = app.run(service.runner.alive, list(ids.values()))
            due = app.run(lambda: service.repository.due_queued(limit=10))
            rows = dict(query(url, "SELECT prompt, status FROM tasks"))
    finally:
        store.delete(*(f"arq:job:{task_id}" for task_id in ids.values()))
        store.close()
        drop_database(url)
    assert live == {ids["waiting"], ids["lost"]}
    assert due == []  # looked at: the next look is QUEUE_CHECK_S away
    assert rows == {"waiting": "queued", "lost": "queued", "spent": "failed"}


def test_store_prompts_false_gives_the_caller_its_text_and_the_database_none(
    upstream: FakeOpenAI, fake_llm: FakeOpenAI, tmp_path
) -> None:
    url = new_database(tmp_path)
    try:
        with running(base_env(upstream, url) | {"STORE_PROMPTS": "false"}) as app:
            submitted = app.run(
                lambda: tasks_of(app).submit(
                    TaskIn(prompt="private", system="be terse"), owner="alice", background=False
                )
            )
            fake_llm.script(Step(raw=b'{"choices": [{"message": {"content": "lone \\ud800"}}]}'))
            hostile = app.run(
                lambda: tasks_of(app).submit(TaskIn(prompt="odd"), owner="alice", background=False)
            )
        assert hostile.task.answer == "lone \ufffd"  # what the caller gets can be encoded
        assert (submitted.task.prompt, submitted.task.system) == ("private", "be terse")
        assert submitted.task.answer == "fake answer to: private"
        rows = query(url, "SELECT prompt, system, answer, answer_chars FROM tasks")
        assert sorted(rows) == [(None, None, None, 6), (None, None, None, 23)]
    finally:
        drop_database(url)


def attempts_counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "reasoning_agent_llm_attempts_total",
        {"provider": "openai", "model": "fake-model", "outcome": outcome},
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("raw", "outcome", "message"),
    [
        (b'{"choices": [', "malformed", "upstream sent a response that is not valid JSON"),
        (b'{"choices": []}', "no_answer", "upstream returned no answer"),
    ],
)
def test_a_hostile_answer_is_counted_by_its_class_and_stored_as_an_upstream_error(
    shared_app: InProcessApp, fake_llm: FakeOpenAI, raw: bytes, outcome: str, message: str
) -> None:
    before = attempts_counted(outcome)
    fake_llm.script(Step(raw=raw))
    with shared_app.client() as client:
        response = client.post("/task", json={"prompt": f"hostile {outcome}"})
    assert response.status_code == 502
    assert response.json()["error"]["message"] == message
    assert attempts_counted(outcome) == before + 1
    task_id = response.json()["error"]["task_id"]
    rows = query(shared_app.database_url, f"SELECT error_type FROM tasks WHERE id = '{task_id}'")
    assert rows == [("upstream_error",)]


class PluginTimeout(DeadlineExceeded):
    """A plugin's own subclass: the class it derives from decides its classification."""


@pytest.mark.parametrize(
    ("error", "answer", "code"),
    [
        (UpstreamError(message="x"), BadGateway, ErrorType.UPSTREAM_ERROR),
        (MalformedAnswer(message="x"), BadGateway, ErrorType.UPSTREAM_ERROR),
        (NoAnswer(message="x"), BadGateway, ErrorType.UPSTREAM_ERROR),
        (UpstreamUnreachable(message="x"), ErrorsUnreachable, ErrorType.CONNECTION_ERROR),
        (DeadlineExceeded(message="x"), GatewayTimeout, ErrorType.DEADLINE_EXCEEDED),
        (PluginTimeout(message="x"), GatewayTimeout, ErrorType.DEADLINE_EXCEEDED),
        (NotConfigured(message="x"), ServiceUnavailable, ErrorType.UNAVAILABLE),
    ],
)
def test_each_llm_error_class_carries_its_code_and_its_answer(
    error: LLMError, answer: type, code: ErrorType
) -> None:
    assert error.code is code
    assert for_llm_error(error) is answer
    assert for_error_type(code) is answer  # a replay of the stored task answers the same


def test_a_stored_error_type_the_api_does_not_answer_with_replays_as_a_bad_gateway() -> None:
    for stored in (ErrorType.INTERRUPTED, ErrorType.CANCELLED, None, "from an older release"):
        assert for_error_type(stored) is BadGateway


@contextlib.contextmanager
def asking_over_own_postgres(
    upstream: FakeOpenAI, fake_llm: FakeOpenAI, prompt: str
) -> Iterator[tuple[OwnPostgres, Future[httpx.Response]]]:
    """POST /task to an app on a PostgreSQL of its own, given back once the row is stored and
    the call is on its way to the LLM, with the response to come."""
    postgres = OwnPostgres().start()
    try:
        env = base_env(upstream, postgres.url) | {"REDIS_URL": redis_url(), "TASK_RUNNER": "arq"}
        with running(env) as app, app.client() as client, ThreadPoolExecutor(1) as pool:
            answering = pool.submit(client.post, "/task", json={"prompt": prompt})
            deadline = time.monotonic() + 10
            while fake_llm.calls == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            yield postgres, answering
    finally:
        postgres.close()


@pytest.mark.database_agnostic  # its own PostgreSQL, whichever pass runs it
def test_an_answer_survives_the_database_going_away_while_the_llm_thinks(
    upstream: FakeOpenAI, fake_llm: FakeOpenAI
) -> None:
    """The final write is retried for a few seconds: the answer it records is paid for."""
    fake_llm.default_delay = 1.0
    prompt = "outlive a restart"
    with asking_over_own_postgres(upstream, fake_llm, prompt) as (postgres, answering):
        postgres.stop()
        time.sleep(2.0)  # down when the answer comes back
        postgres.start()
        response = answering.result(timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == f"fake answer to: {prompt}"
        rows = query(postgres.url, "SELECT status, answer FROM tasks")
    assert rows == [("completed", f"fake answer to: {prompt}")]


@pytest.mark.database_agnostic  # its own PostgreSQL, whichever pass runs it
def test_an_answer_whose_database_stays_away_is_a_503_that_names_the_task(
    upstream: FakeOpenAI, fake_llm: FakeOpenAI
) -> None:
    """Past the final write's retries the caller learns which task lost its outcome; the
    row is left to its lease, so the sweep fails it once the database is back."""
    fake_llm.default_delay = 0.5
    with asking_over_own_postgres(upstream, fake_llm, "outlive nothing") as (postgres, answering):
        postgres.stop()
        response = answering.result(timeout=30)
        postgres.start()
        rows = query(postgres.url, "SELECT id, status FROM tasks")
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "database_unavailable"
    assert rows == [(error["task_id"], "pending")]
