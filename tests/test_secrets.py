"""No API key and no OpenAI key in the logs or in the database file, whatever happens."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartService
from tests.fake_openai import FakeOpenAI, Step
from tests.support import ALICE, BOB, OPENAI_KEY, query


def test_keys_never_reach_logs_or_the_database(
    start_service: StartService, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    service = start_service(LOG_LEVEL="DEBUG", RATE_LIMIT="3/minute")
    with service.client(ALICE) as alice, service.client(BOB) as bob:
        assert alice.post("/task", json={"prompt": "hello"}).status_code == 200
        fake_llm.script(Step(status=401, body={"error": {"message": f"bad key {OPENAI_KEY}"}}))
        assert alice.post("/task", json={"prompt": "upstream refuses"}).status_code == 502
        alice.post("/task", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"})
        assert alice.post("/task", json={"prompt": "limited"}).status_code == 429
        assert bob.get("/query").status_code == 200
        for path in ("/query", "/healthz", "/metrics"):
            for response in (alice.get(path), bob.get(path)):
                assert ALICE not in response.text and OPENAI_KEY not in response.text
    with service.client("wrong-key-but-long-enough-0000") as stranger:
        assert stranger.get("/query").status_code == 401
    service.stop()

    logs = service.logs()
    assert '"key": "alice"' in logs and "llm attempt" in logs  # the logs did capture requests
    for secret in (ALICE, BOB, OPENAI_KEY, "wrong-key-but-long-enough-0000"):
        assert secret not in logs
    url = service.env["DATABASE_URL"]
    stored = [file.read_bytes() for file in tmp_path.glob("tasks.db*")]  # every SQLite page
    if not stored:
        stored = [repr(query(url, "SELECT * FROM tasks")).encode()]
    assert b"hello" in b"".join(stored)  # the dump does hold the tasks
    for data in stored:
        for secret in (ALICE, BOB, OPENAI_KEY):
            assert secret.encode() not in data
