"""POST /task, GET /task/{id} and GET /query, in-process over the ASGI interface (a real server
where the socket matters), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fake_openai import FakeOpenAI, Step
from tests.inprocess import InProcessApp
from tests.support import ALICE, BOB, Service, query, write_lock


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def test_a_prompt_gets_the_upstream_answer_and_is_stored(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    prompt = unique("What is the capital of France?")
    with shared_app.client() as client:
        response = client.post(
            "/task",
            json={
                "prompt": prompt,
                "system": "Be brief.",
                "temperature": 0.2,
                "max_tokens": 50,
                "metadata": {"team": "geo"},
            },
        )
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["status"] == "completed"
        assert task["answer"] == f"fake answer to: {prompt}"
        assert task["model"] == "fake-model"
        assert task["attempts"] == 1
        assert task["usage"]["total_tokens"] == (
            task["usage"]["prompt_tokens"] + task["usage"]["completion_tokens"]
        )
        assert task["metadata"] == {"team": "geo"}
        assert task["error"] is None and task["completed_at"] >= task["created_at"]
        assert response.headers["X-RateLimit-Limit"] == "100000"
        assert "Retry-After" not in response.headers

        sent = fake_llm.requests[-1].body
        assert sent["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompt},
        ]
        assert sent["temperature"] == 0.2 and sent["max_tokens"] == 50

        again = client.get(f"/task/{task['id']}")
        assert again.status_code == 200
        assert again.json() == task


def test_another_key_sees_none_of_the_first_keys_tasks(shared_app: InProcessApp) -> None:
    prompt = unique("private to alice")
    with shared_app.client(ALICE) as alice, shared_app.client(BOB) as bob:
        task = alice.post("/task", json={"prompt": prompt}).json()
        missing = bob.get(f"/task/{task['id']}")
        assert missing.status_code == 404
        assert missing.json() == {"error": {"type": "not_found", "message": "no such task"}}
        assert bob.get(f"/task/{uuid.uuid4().hex}").json() == missing.json()
        assert bob.get("/query", params={"q": prompt}).json()["items"] == []
        found = alice.get("/query", params={"q": prompt}).json()["items"]
        assert [t["id"] for t in found] == [task["id"]]


def test_the_same_idempotency_key_returns_the_same_task_without_a_second_call(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    body = {"prompt": unique("idempotent")}
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    with shared_app.client() as client:
        first = client.post("/task", json=body, headers=headers)
        second = client.post("/task", json=body, headers=headers)
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        assert fake_llm.calls == 1

        changed = client.post("/task", json={"prompt": "something else"}, headers=headers)
        assert changed.status_code == 422
        assert "Idempotency-Key" in changed.json()["error"]["message"]
        assert fake_llm.calls == 1

    with shared_app.client(BOB) as bob:  # keys are per caller: Bob's is a new task
        other = bob.post("/task", json=body, headers=headers)
        assert other.status_code == 200 and other.json()["id"] != first.json()["id"]
        assert fake_llm.calls == 2


def test_the_llm_is_asked_only_once_the_pending_row_is_stored(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    """With the database's write lock held elsewhere, no request reaches the LLM: a call that
    is paid for always has a row to be recorded on."""
    url = shared_app.database_url
    plain, keyed = unique("asked once stored"), unique("asked once the key is stored")
    with ThreadPoolExecutor(2) as pool, shared_app.client() as client:
        with write_lock(url):
            first = pool.submit(client.post, "/task", json={"prompt": plain})
            second = pool.submit(
                client.post,
                "/task",
                json={"prompt": keyed},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            time.sleep(0.5)  # time enough for either to reach the LLM, were it sent
            assert fake_llm.calls == 0
            assert not first.done() and not second.done()
        for response in (first.result(timeout=30), second.result(timeout=30)):
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "completed"
    assert sorted(r.body["messages"][-1]["content"] for r in fake_llm.requests) == sorted(
        [plain, keyed]
    )
    stored = query(url, f"SELECT status FROM tasks WHERE prompt IN ('{plain}', '{keyed}')")
    assert stored == [("completed",), ("completed",)]


def test_concurrent_requests_with_one_idempotency_key_make_one_task(
    shared_service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.default_delay = 0.5
    body = {"prompt": unique("raced")}
    headers = {"X-API-Key": ALICE, "Idempotency-Key": uuid.uuid4().hex}

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=shared_service.base_url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/task", json=body, headers=headers) for _ in range(5))
            )

    responses = asyncio.run(race())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}
    assert len({r.json()["id"] for r in responses if r.status_code == 200}) == 1
    assert fake_llm.calls == 1


def test_query_pages_newest_first_and_stays_stable_while_tasks_arrive(
    shared_app: InProcessApp,
) -> None:
    tag = uuid.uuid4().hex[:10]
    with shared_app.client() as client:
        created = [
            client.post("/task", json={"prompt": f"page {tag} #{i}"}).json()["id"] for i in range(7)
        ]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"q": tag, "limit": 3} | ({"cursor": cursor} if cursor else {})
            page = client.get("/query", params=params).json()
            seen += [t["id"] for t in page["items"]]
            if (
                len(seen) == 3
            ):  # a task created mid-walk lands before the cursor, not in later pages
                client.post("/task", json={"prompt": f"page {tag} late"})
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(created))
        assert len(client.get("/query", params={"q": tag, "limit": 100}).json()["items"]) == 8


def test_query_filters_by_status_and_time(shared_app: InProcessApp, fake_llm: FakeOpenAI) -> None:
    tag = uuid.uuid4().hex[:10]
    with shared_app.client() as client:
        ok = client.post("/task", json={"prompt": f"filter {tag}"}).json()
        fake_llm.script(Step(status=400))
        failed = client.post("/task", json={"prompt": f"filter {tag} bad"})
        assert failed.status_code == 502
        failed_id = failed.json()["error"]["task_id"]

        by_status = client.get("/query", params={"q": tag, "status": "failed"}).json()["items"]
        assert [t["id"] for t in by_status] == [failed_id]
        assert by_status[0]["error"] == "upstream answered HTTP 400 after 1 attempt"

        after = client.get("/query", params={"q": tag, "since": ok["completed_at"]}).json()
        assert [t["id"] for t in after["items"]] == [failed_id]
        before = client.get("/query", params={"q": tag, "until": ok["completed_at"]}).json()
        assert [t["id"] for t in before["items"]] == [ok["id"]]


def test_query_text_is_matched_literally(shared_app: InProcessApp) -> None:
    tag = uuid.uuid4().hex[:10]
    with shared_app.client() as client:
        special = client.post("/task", json={"prompt": f"{tag} 100%_done' OR 1=1 --"}).json()
        client.post(
            "/task", json={"prompt": f"{tag} 100 xdone"}
        )  # matches if % and _ were wildcards
        for q in (f"{tag} 100%_done", f"{tag} 100%_done' OR 1=1 --"):
            ids = [t["id"] for t in client.get("/query", params={"q": q}).json()["items"]]
            assert ids == [special["id"]], q
        for q in ("%", "_"):
            items = client.get("/query", params={"q": q, "limit": 100}).json()["items"]
            assert special["id"] in [t["id"] for t in items]
            assert all(q in t["prompt"] or q in (t["answer"] or "") for t in items)


def test_non_ascii_text_round_trips(shared_app: InProcessApp) -> None:
    prompt = unique("Ünïcödé 漢字 emoji 🚀 and RTL עברית")
    with shared_app.client() as client:
        task = client.post("/task", json={"prompt": prompt}).json()
        assert task["prompt"] == prompt
        found = client.get("/query", params={"q": "漢字 emoji 🚀"}).json()["items"]
        assert task["id"] in [t["id"] for t in found]


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


BAD_INPUTS = [
    (
        "malformed json",
        "post",
        "/task",
        {"content": b'{"prompt": ', "headers": {"content-type": "application/json"}},
        422,
    ),
    ("not an object", "post", "/task", {"json": ["prompt"]}, 422),
    ("prompt missing", "post", "/task", {"json": {}}, 422),
    ("prompt wrong type", "post", "/task", {"json": {"prompt": 42}}, 422),
    ("prompt empty", "post", "/task", {"json": {"prompt": ""}}, 422),
    ("prompt blank", "post", "/task", {"json": {"prompt": "   \n"}}, 422),
    ("prompt too long", "post", "/task", {"json": {"prompt": "x" * 32_001}}, 413),
    ("prompt with NUL", "post", "/task", {"json": {"prompt": "a\u0000b"}}, 422),
    (
        "lone surrogate",
        "post",
        "/task",
        {"content": b'{"prompt": "\\ud800"}', "headers": {"content-type": "application/json"}},
        422,
    ),
    ("unknown field", "post", "/task", {"json": {"prompt": "hi", "promt": "typo"}}, 422),
    ("temperature as text", "post", "/task", {"json": {"prompt": "hi", "temperature": "hot"}}, 422),
    ("temperature too high", "post", "/task", {"json": {"prompt": "hi", "temperature": 9}}, 422),
    ("max_tokens zero", "post", "/task", {"json": {"prompt": "hi", "max_tokens": 0}}, 422),
    (
        "metadata not strings",
        "post",
        "/task",
        {"json": {"prompt": "hi", "metadata": {"a": 1}}},
        422,
    ),
    (
        "body over the limit",
        "post",
        "/task",
        {"content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}},
        413,
    ),
    (
        "idempotency key too long",
        "post",
        "/task",
        {"json": {"prompt": "hi"}, "headers": {"Idempotency-Key": "k" * 300}},
        422,
    ),
    ("limit zero", "get", "/query", {"params": {"limit": 0}}, 422),
    ("limit 1000", "get", "/query", {"params": {"limit": 1000}}, 422),
    ("limit not a number", "get", "/query", {"params": {"limit": "ten"}}, 422),
    ("garbage cursor", "get", "/query", {"params": {"cursor": "not-a-cursor!!"}}, 422),
    ("forged cursor", "get", "/query", {"params": {"cursor": cursor_of("yesterday|x")}}, 422),
    ("unknown status", "get", "/query", {"params": {"status": "done"}}, 422),
    ("bad since", "get", "/query", {"params": {"since": "last tuesday"}}, 422),
    (
        "since past year 9999 in UTC",
        "get",
        "/query",
        {"params": {"since": "9999-12-31T23:00:00-05:00"}},
        422,
    ),
    (
        "until before year 1 in UTC",
        "get",
        "/query",
        {"params": {"until": "0001-01-01T00:00:00+05:00"}},
        422,
    ),
    ("until as a Unix time", "get", "/query", {"params": {"until": "0.5"}}, 422),
    ("since as a Unix time", "get", "/query", {"params": {"since": "1700000000"}}, 422),
    (
        "cursor past year 9999 in UTC",
        "get",
        "/query",
        {"params": {"cursor": cursor_of("9999-12-31T23:00:00-05:00|" + "a" * 32)}},
        422,
    ),
    ("NUL in q", "get", "/query", {"params": {"q": "a\u0000b"}}, 422),
    ("q too long", "get", "/query", {"params": {"q": "q" * 501}}, 422),
    ("unknown route", "get", "/nope", {}, 404),
    ("wrong method", "delete", "/query", {}, 405),
]


@pytest.mark.parametrize(
    ("method", "path", "options", "status"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_a_clear_json_error(
    shared_app: InProcessApp, method: str, path: str, options: dict, status: int
) -> None:
    with shared_app.client() as client:
        before = client.get("/query", params={"limit": 100}).json()["items"]
        response = client.request(method.upper(), path, **options)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["type"] and error["message"]
        assert "Traceback" not in response.text
        assert "Retry-After" not in response.headers
        after = client.get("/query", params={"limit": 100}).json()["items"]
        assert [t["id"] for t in after] == [t["id"] for t in before]  # nothing stored, nothing lost


def test_missing_or_wrong_key_is_refused_before_the_body_is_read(shared_app: InProcessApp) -> None:
    for key in (None, "wrong-key-0123456789abcdef", "x" * 10_000):
        with shared_app.client(key) as client:
            for method, path in (
                ("POST", "/task"),
                ("GET", "/query"),
                ("GET", "/healthz"),
                ("GET", "/metrics"),
                ("GET", "/openapi.json"),
            ):
                response = client.request(method, path, content=b"{malformed")
                assert response.status_code == 401, (key, path)
                assert response.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'
                assert response.json()["error"]["type"] == "unauthorized"


def test_a_failed_task_replays_its_error_for_the_same_idempotency_key(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(status=400))
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    with shared_app.client() as client:
        first = client.post("/task", json={"prompt": "fails once"}, headers=headers)
        second = client.post("/task", json={"prompt": "fails once"}, headers=headers)
    assert first.status_code == second.status_code == 502
    assert first.json() == second.json()
    assert fake_llm.calls == 1


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(
    shared_service: Service,
) -> None:
    def body():  # no Content-Length: the service must count as the bytes arrive
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * 65536
        yield b'"}'

    with shared_service.client() as client:
        response = client.post(
            "/task", content=body(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


def test_an_answer_the_database_cannot_store_as_sent_is_stored_made_safe(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    """A paid answer is never lost to its bytes: NUL and lone surrogates replaced, the model
    name cut to its column, absurd token counts clamped."""
    raw = (
        b'{"choices": [{"index": 0, "message": {"role": "assistant", '
        b'"content": "a\\u0000b\\ud800c"}}], "model": "' + b"m" * 300 + b'", '
        b'"usage": {"prompt_tokens": 3000000000, "completion_tokens": 100000000000000000000}}'
    )
    fake_llm.script(Step(raw=raw))
    with shared_app.client() as client:
        response = client.post("/task", json={"prompt": unique("hostile bytes")})
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["answer"] == "a\ufffdb\ufffdc"
        assert task["model"] == "m" * 200
        assert task["usage"]["prompt_tokens"] == 2**31 - 1
        assert task["usage"]["completion_tokens"] == 2**31 - 1
        assert client.get(f"/task/{task['id']}").json() == task


@contextlib.contextmanager
def refusing_answers_with(url: str, marker: str) -> Iterator[None]:
    """A database that refuses to store any answer holding `marker`, as a constraint would."""
    name = f"refuse_{marker}"
    if url.startswith("sqlite"):
        query(
            url,
            f"CREATE TRIGGER {name} BEFORE UPDATE ON tasks WHEN NEW.answer LIKE '%{marker}%' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        drop = [f"DROP TRIGGER {name}"]
    else:
        query(
            url,
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.answer LIKE '%{marker}%' THEN RAISE EXCEPTION 'refused'; END IF; "
            "RETURN NEW; END $$",
        )
        query(
            url,
            f"CREATE TRIGGER {name} BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION {name}()",
        )
        drop = [f"DROP TRIGGER {name} ON tasks", f"DROP FUNCTION {name}()"]
    try:
        yield
    finally:
        for statement in drop:
            query(url, statement)


def test_an_answer_the_database_refuses_fails_its_task_with_store_error(
    shared_app: InProcessApp, fake_llm: FakeOpenAI
) -> None:
    """The row never stays pending while the database answers: the task fails with
    `store_error`, and the caller gets 502 with the task's id (its replay too)."""
    marker = uuid.uuid4().hex
    headers = {"Idempotency-Key": marker}
    with refusing_answers_with(shared_app.database_url, marker), shared_app.client() as client:
        response = client.post("/task", json={"prompt": marker}, headers=headers)
        again = client.post("/task", json={"prompt": marker}, headers=headers)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "store_error"
    assert error["message"] == "the database refused to store the upstream's answer"
    assert again.status_code == 502 and again.json() == response.json()
    rows = query(
        shared_app.database_url,
        f"SELECT status, error_type, answer FROM tasks WHERE id = '{error['task_id']}'",
    )
    assert rows == [("failed", "store_error", None)]
