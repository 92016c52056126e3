"""Streamed answers and followed tasks: Server-Sent Events from a real service, the real
`openai` SDK streaming from the fake upstream."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartService, module_service
from tests.deploy.conftest import missing
from tests.fake_openai import FakeOpenAI, Step
from tests.sse import deltas, read_stream
from tests.support import ALICE, BOB, Service, free_port, wait_for

HEARTBEAT_S = 0.3

service = module_service(
    "streams",
    LLM_MAX_ATTEMPTS="3",
    LLM_TIMEOUT_S="8",
    RATE_LIMIT="10000/minute",
    QUERY_RATE_LIMIT="10000/minute",
    STREAM_HEARTBEAT_S=str(HEARTBEAT_S),
)


def test_a_streamed_task_sends_the_task_each_piece_and_the_stored_end(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(
        Step(reasoning=["Six ", "times ", "seven."], pieces=["The ", "answer ", "is 42"])
    )
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "why", "stream": True})
        stored = client.get(f"/task/{stream.events[0].data['id']}").json()
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert "content-length" not in stream.headers
    kinds = [e.kind for e in stream.events]
    assert kinds[0] == "task" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    assert [e.id for e in stream.events] == list(range(1, len(stream.events) + 1))
    assert stream.events[0].data["status"] == "pending"
    assert deltas(stream) == "The answer is 42" == stored["answer"]
    assert deltas(stream, "reasoning") == "Six times seven." == stored["reasoning"]
    done = stream.events[-1].data
    assert done == stored  # the final task exactly as stored
    assert done["usage"] == {  # from the upstream's last chunk
        "prompt_tokens": 1,
        "completion_tokens": 6,
        "total_tokens": 7,
        "reasoning_tokens": None,
    }
    sent = fake_llm.requests[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    logged = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    attempt = [line for line in logged if line.get("message") == "llm attempt"][-1]
    assert attempt["outcome"] == "ok" and 0 < attempt["first_token_ms"] <= attempt["duration_ms"]


def test_accept_text_event_stream_asks_for_a_stream_too(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    with service.client() as client:
        stream = read_stream(
            client, "POST", "/task", json={"prompt": "by header"},
            headers={"Accept": "text/event-stream"},
        )  # fmt: skip
    assert stream.events[-1].kind == "done"
    assert deltas(stream) == "fake answer to: by header"


def test_keep_alive_comments_while_the_upstream_is_silent(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(silence=HEARTBEAT_S * 4))
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "slow", "stream": True})
    assert stream.events[-1].kind == "done"
    keep_alives = [at for at, text in stream.comments if text == "keep-alive"]
    assert len(keep_alives) >= 3, stream.comments  # three heartbeat periods of silence


def test_no_keep_alive_while_pieces_come_faster_than_the_heartbeat(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(pieces=[f"w{i} " for i in range(12)], pause=HEARTBEAT_S / 3))
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "busy", "stream": True})
    assert stream.events[-1].kind == "done"
    # 1.2 s of pieces, each within a third of a heartbeat: a keep-alive only where a busy host
    # really left the stream silent for a heartbeat.
    for at, _ in stream.comments:
        before = max([e.at for e in stream.events if e.at < at], default=0.0)
        assert at - before >= HEARTBEAT_S * 0.8, (at, [e.at for e in stream.events])


def test_no_usage_chunk_means_no_usage(service: Service, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(usage=None))
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "uncounted", "stream": True})
    assert stream.events[-1].data["usage"] is None


# Chunks no chat completion stream sends: each is passed over, the good one kept.
_HOSTILE_CHUNKS = [
    42,
    "text",
    None,
    [],
    {"choices": "x"},
    {"choices": [7]},
    {"choices": [{"delta": "a string"}]},
    {"choices": [{"delta": {"content": 5, "reasoning_content": ["r"]}}], "model": ["m"]},
    {"choices": [{"delta": {"content": "Paris"}}], "model": 7},
    {"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": "7"}},
]


def test_chunks_of_any_other_shape_are_passed_over(service: Service, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(chunks=_HOSTILE_CHUNKS))
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "odd", "stream": True})
    done = stream.events[-1]
    assert done.kind == "done", done
    assert deltas(stream) == done.data["answer"] == "Paris"
    assert done.data["model"] == stream.events[0].data["model"]  # not one the chunks named
    assert done.data["usage"] is None  # no count it could trust


def test_a_stream_of_nothing_but_odd_chunks_has_no_answer(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(chunks=_HOSTILE_CHUNKS[:-2]))
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "odder", "stream": True})
    error = stream.events[-1]
    assert error.kind == "error", error
    assert error.data["error"]["type"] == "upstream_error"
    assert error.data["error"]["message"] == "upstream streamed no answer"


def test_a_failure_before_the_first_piece_is_retried(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(status=500), Step(break_after=0))  # the second drops before a piece
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "again", "stream": True})
    assert fake_llm.calls == 3
    done = stream.events[-1]
    assert done.kind == "done" and done.data["attempts"] == 3
    assert deltas(stream) == done.data["answer"] == "fake answer to: again"


def test_a_failure_after_the_first_piece_ends_the_stream_and_keeps_what_was_sent(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(pieces=["one ", "two ", "three"], break_after=2))
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json={"prompt": "broken", "stream": True})
        task_id = stream.events[0].data["id"]
        stored = client.get(f"/task/{task_id}").json()
    assert fake_llm.calls == 1  # not retried: the client had a part of the answer
    error = stream.events[-1]
    assert error.kind == "error" and error.data["error"]["task_id"] == task_id
    assert error.data["error"]["type"] == "upstream_error"
    assert "after 8 characters" in error.data["error"]["message"]
    assert deltas(stream) == "one two "
    assert stored["status"] == "failed" and stored["answer"] == "one two "
    assert stored["answer_chars"] == 8


def test_a_client_that_hangs_up_resumes_with_last_event_id(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    words = [f"w{i} " for i in range(12)]
    fake_llm.script(Step(pieces=words, pause=0.1))
    with service.client() as client:
        first = read_stream(
            client, "POST", "/task", json={"prompt": "long", "stream": True}, stop_after=4
        )
        task_id, last = first.events[0].data["id"], first.events[-1].id
        rest = read_stream(
            client, "GET", f"/task/{task_id}/events", headers={"Last-Event-ID": str(last)}
        )
        stored = client.get(f"/task/{task_id}").json()
    assert [e.id for e in rest.events] == list(range(last + 1, last + 1 + len(rest.events)))
    assert rest.events[-1].kind == "done"
    assert deltas(first) + deltas(rest) == "".join(words) == stored["answer"]


def test_a_finished_task_is_followed_at_once_and_only_by_its_owner(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    with service.client() as client:
        task = client.post("/task", json={"prompt": "plain"}).json()
        followed = read_stream(client, "GET", f"/task/{task['id']}/events")
    assert [e.kind for e in followed.events] == ["task", "done"]
    assert followed.events[-1].data == task
    with service.client(BOB) as other:
        assert other.get(f"/task/{task['id']}/events").status_code == 404


def test_a_disconnected_stream_still_runs_to_the_end(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(pieces=["a ", "b ", "c ", "d"], pause=0.2))
    with service.client() as client:
        first = read_stream(
            client, "POST", "/task", json={"prompt": "leave", "stream": True}, stop_after=2
        )
        task = wait_for(client, first.events[0].data["id"], {"completed"}, timeout=10)
    assert task["status"] == "completed" and task["answer"] == "a b c d"
    with service.client() as client:  # alice reads /metrics
        metrics = client.get("/metrics").text
    assert 'reasoning_agent_stream_disconnects_total{task="continued"}' in metrics
    assert "reasoning_agent_streams_open 0.0" in metrics
    first_tokens = (
        'reasoning_agent_llm_first_token_seconds_count{model="fake-model",provider="openai"}'
    )
    assert first_tokens in metrics


def test_with_stream_on_disconnect_cancel_a_client_gone_stops_the_task(
    start_service: StartService, fake_llm: FakeOpenAI
) -> None:
    cancelling = start_service(STREAM_ON_DISCONNECT="cancel")
    fake_llm.script(Step(pieces=[f"w{i} " for i in range(40)], pause=0.1))
    with cancelling.client() as client:
        first = read_stream(
            client, "POST", "/task", json={"prompt": "bye", "stream": True}, stop_after=2
        )
        task = wait_for(client, first.events[0].data["id"], {"cancelled"}, timeout=10)
        metrics = client.get("/metrics").text
    assert task["status"] == "cancelled"
    assert 'reasoning_agent_stream_disconnects_total{task="cancelled"} 1.0' in metrics


def test_cancelling_a_stream_stops_it(service: Service, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Step(pieces=[f"w{i} " for i in range(50)], pause=0.1))
    with service.client() as client:
        first = read_stream(
            client, "POST", "/task", json={"prompt": "stop me", "stream": True}, stop_after=3
        )
        task_id = first.events[0].data["id"]
        cancelled = client.delete(f"/task/{task_id}")
        assert cancelled.status_code == 200, cancelled.text
        rest = read_stream(client, "GET", f"/task/{task_id}/events", headers={"Last-Event-ID": "3"})
    assert cancelled.json()["status"] == "cancelled"
    assert rest.events[-1].kind == "done" and rest.events[-1].data["status"] == "cancelled"
    assert len(deltas(first) + deltas(rest)) < len("".join(f"w{i} " for i in range(50)))


def test_a_background_task_publishes_the_same_events(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(pieces=["later ", "on"], pause=0.1))
    with service.client() as client:
        accepted = client.post("/task", json={"prompt": "bg", "mode": "async"})
        assert accepted.status_code == 202
        followed = read_stream(client, "GET", f"/task/{accepted.json()['id']}/events")
    assert followed.events[-1].kind == "done"
    assert followed.events[-1].data["answer"] == "later on"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "stream": True, "mode": "async"},
        {"prompt": "x", "stream": "yes"},
        {"prompt": "x", "reasoning_effort": "extreme"},
    ],
)
def test_bad_stream_requests_are_refused_plainly(service: Service, body: dict) -> None:
    with service.client() as client:
        response = client.post("/task", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"


NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            # proxy_buffering is on, as nginx ships it
        }}
    }}
}}
"""


@pytest.fixture
def nginx(service: Service, tmp_path: Path) -> Iterator[str]:
    """nginx from Debian's packages on loopback, proxying to the service with its defaults."""
    binary = Path("/usr/sbin/nginx")
    if not binary.exists():
        missing("nginx is not installed (make tools installs it)")
    port = free_port()
    upstream = service.base_url.rsplit(":", 1)[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, port=port, upstream=upstream))
    process = subprocess.Popen(
        [str(binary), "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1)
                break
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_first_piece_passes_a_buffering_proxy_before_the_answer_ends(
    service: Service, fake_llm: FakeOpenAI, nginx: str
) -> None:
    fake_llm.script(Step(pieces=[f"w{i} " for i in range(10)], pause=0.3))
    started = time.monotonic()
    first_delta = None
    with (
        httpx.Client(base_url=nginx, headers={"X-API-Key": ALICE}, timeout=30) as client,
        client.stream("POST", "/task", json={"prompt": "proxied", "stream": True}) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "event: delta" and first_delta is None:
                first_delta = time.monotonic() - started
    total = time.monotonic() - started
    assert total >= 3.0  # ten pieces 0.3 s apart
    assert first_delta is not None and first_delta < 1.5, (first_delta, total)


def test_a_plain_request_is_not_cancelled_under_its_caller(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Step(delay=1.5))
    with service.client() as client, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, "/task", json={"prompt": "let me finish"})
        deadline = time.monotonic() + 5
        while not (items := client.get("/query", params={"status": "pending"}).json()["items"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = client.delete(f"/task/{items[0]['id']}")
        assert refused.status_code == 409, refused.text
        assert answer.result().status_code == 200
        assert answer.result().json()["status"] == "completed"


def test_a_streamed_reasoning_model_reports_its_reasoning_tokens_once(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 50,
        "total_tokens": 55,
        "completion_tokens_details": {"reasoning_tokens": 40},
    }
    fake_llm.script(Step(pieces=["42"], usage=usage))
    body = {"prompt": "o", "model": "o3", "stream": True, "temperature": 1, "max_tokens": 64}
    with service.client() as client:
        stream = read_stream(client, "POST", "/task", json=body)
    done = stream.events[-1].data
    assert done["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 50,
        "total_tokens": 55,
        "reasoning_tokens": 40,
    }
    sent = fake_llm.requests[-1].body
    assert sent["max_completion_tokens"] == 64 and "temperature" not in sent
    assert done["dropped_params"] == ["temperature"]
