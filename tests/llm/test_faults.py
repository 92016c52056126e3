"""Every upstream fault ends in the right status, a failed task with a clear error, and a
service that answers the next request."""

from __future__ import annotations

import json

import pytest

from tests.conftest import module_service
from tests.fake_openai import FakeOpenAI, Step
from tests.support import Service

service = module_service(
    "faults",
    LLM_MAX_ATTEMPTS="2",
    LLM_TIMEOUT_S="2",
    RATE_LIMIT="10000/minute",
)


_MALFORMED = "upstream sent a response that is not valid JSON"
COMPLETION = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}

FAULTS = [
    (
        "429 twice",
        [Step(status=429, headers={"Retry-After": "0"})] * 2,
        502,
        "upstream answered HTTP 429 after 2 attempts",
        2,
    ),
    ("500 twice", [Step(status=500)] * 2, 502, "upstream answered HTTP 500 after 2 attempts", 2),
    ("503 twice", [Step(status=503)] * 2, 502, "upstream answered HTTP 503 after 2 attempts", 2),
    (
        "connection reset twice",
        [Step(reset=True)] * 2,
        502,
        "upstream unreachable after 2 attempts",
        2,
    ),
    ("hang past the deadline", [Step(hang=True)], 504, "upstream timed out after 1 attempt", 1),
    (
        "malformed JSON",
        [Step(raw=b'{"choices": [')],
        502,
        _MALFORMED,
        1,
    ),
    (
        "empty choices",
        [Step(raw=json.dumps(COMPLETION).encode())],
        502,
        "upstream returned no answer",
        1,
    ),
    (
        "no content",
        [
            Step(
                raw=json.dumps(
                    {
                        **COMPLETION,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": None},
                            }
                        ],
                    }
                ).encode()
            )
        ],
        502,
        "upstream returned no answer",
        1,
    ),
    *(
        (name, [Step(raw=raw)], 502, "upstream returned no answer", 1)
        for name, raw in [
            ("a JSON list", b"[]"),
            ("a JSON string", b'"Paris"'),
            ("choices not a list", b'{"choices": {"0": {}}}'),
            ("message not an object", b'{"choices": [{"message": "Paris"}]}'),
            ("content a number", b'{"choices": [{"message": {"content": 42}}]}'),
        ]
    ),
    ("not UTF-8", [Step(raw=b'{"choices": "\xff\xfe"}')], 502, _MALFORMED, 1),
]


@pytest.mark.parametrize(
    ("steps", "status", "message", "calls"),
    [f[1:] for f in FAULTS],
    ids=[f[0] for f in FAULTS],
)
def test_an_upstream_fault_fails_the_task_clearly(
    service: Service, fake_llm: FakeOpenAI, steps: list[Step], status: int, message: str, calls: int
) -> None:
    fake_llm.script(*steps)
    with service.client() as client:
        response = client.post("/task", json={"prompt": "meet a fault"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] == message
        task = client.get(f"/task/{error['task_id']}").json()
        assert task["status"] == "failed" and task["error"] == message
        assert fake_llm.calls == calls
        fake_llm.reset()
        after = client.post("/task", json={"prompt": "and the next one works"})
        assert after.status_code == 200 and after.json()["status"] == "completed"
    assert "Traceback" not in service.logs()


def test_odd_usage_fields_do_not_spoil_a_good_answer(
    service: Service, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(
        Step(
            raw=json.dumps(
                {
                    "choices": [{"message": {"content": "Paris"}}],
                    "usage": {"prompt_tokens": "12", "completion_tokens": -1},
                    "model": None,
                }
            ).encode()
        )
    )
    with service.client() as client:
        task = client.post("/task", json={"prompt": "odd usage"}).json()
    assert task["answer"] == "Paris"
    assert task["usage"] is None  # neither count was a count
    assert task["model"]  # the model asked for, as the upstream named none
