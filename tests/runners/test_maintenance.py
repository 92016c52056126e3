"""RETENTION_DAYS deletes old tasks in batches; STORE_PROMPTS=false keeps lengths and hashes only."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path

from reasoning_agent.runners import maintenance
from reasoning_agent.storage import db
from tests.conftest import StartService
from tests.support import query


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_store_prompts_false_keeps_no_text(start_service: StartService) -> None:
    service = start_service(STORE_PROMPTS="false", LLM_PROVIDER="mock", MOCK_STREAM_DELAY_MS="0")
    prompt = "a confidential prompt about project kestrel"
    with service.client() as client:
        posted = client.post("/task", json={"prompt": prompt, "system": "be terse"}).json()
        assert posted["prompt"] == prompt and posted["answer"].startswith("[mock answer")
        assert "answers them all alike" in posted["reasoning"]
        streamed = client.post("/task", json={"prompt": f"{prompt}, streamed", "stream": True})
        done = json.loads(streamed.text.strip().split("\n")[-1].removeprefix("data: "))
        assert done["answer"].startswith("[mock answer") and done["reasoning"]  # the caller's
        stored = client.get(f"/task/{posted['id']}").json()
        assert stored["prompt"] is None and stored["answer"] is None and stored["system"] is None
        assert stored["reasoning"] is None
        assert client.get(f"/task/{done['id']}").json()["answer"] is None
        assert stored["prompt_chars"] == len(prompt) and stored["prompt_sha256"] == sha256(prompt)
        assert stored["answer_chars"] == len(posted["answer"])
        assert stored["answer_sha256"] == sha256(posted["answer"])
        assert client.get("/query", params={"q": "kestrel"}).json()["items"] == []
    dump = repr(query(service.env["DATABASE_URL"], "SELECT * FROM tasks"))
    assert "kestrel" not in dump and "terse" not in dump and "[mock answer" not in dump
    assert "alike" not in dump
    assert sha256(prompt) in dump


def test_retention_deletes_only_old_tasks(start_service: StartService) -> None:
    service = start_service(LLM_PROVIDER="mock", RETENTION_DAYS="7", RETENTION_INTERVAL_S="1")
    with service.client() as client:
        ids = [client.post("/task", json={"prompt": f"t{i}"}).json()["id"] for i in range(5)]
    old = ids[:3]
    url = service.env["DATABASE_URL"]
    back = (
        "datetime('now', '-10 days')" if url.startswith("sqlite") else "now() - interval '10 days'"
    )
    quoted = ", ".join(f"'{i}'" for i in old)
    query(url, f"UPDATE tasks SET created_at = {back} WHERE id IN ({quoted})")
    deadline = time.monotonic() + 20
    while len(query(url, "SELECT id FROM tasks")) > 2:
        assert time.monotonic() < deadline, "retention never ran"
        time.sleep(0.3)
    assert sorted(r[0] for r in query(url, "SELECT id FROM tasks")) == sorted(ids[3:])
    while '"message": "retention deleted old tasks"' not in service.logs():  # logged after commit
        assert time.monotonic() < deadline, "retention deleted without saying so"
        time.sleep(0.1)
    assert '"deleted": 3' in service.logs()


def test_purge_works_in_batches(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/purge.db"
    db.migrate(url)
    rows = ", ".join(
        f"('{i:032x}', 'o', 'h', 'completed', 'p', 'm', '{{}}', 0, datetime('now', '-{d} days'))"
        for i, d in enumerate([30] * 7 + [1] * 2)
    )
    query(
        url,
        "INSERT INTO tasks (id, owner, request_hash, status, prompt, model, metadata, "
        f"attempts, created_at) VALUES {rows}",
    )

    async def run() -> int | None:
        database = db.Database(url)
        try:
            return await maintenance.purge(database, older_than=timedelta(days=7), batch=3)
        finally:
            await database.aclose()

    assert asyncio.run(run()) == 7
    assert query(url, "SELECT count(*) FROM tasks") == [(2,)]
