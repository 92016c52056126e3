"""Server start-up owns the process-wide tuning: building or starting the app changes nothing
global, and the served app tunes the collector once its lifespan has started; and it says
where it serves."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from reasoning_agent import server
from tests.conftest import StartService, base_env
from tests.fake_openai import FakeOpenAI
from tests.inprocess import running
from tests.support import free_port

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic


def test_starting_the_app_leaves_the_collector_as_it_was(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    with running(base_env(upstream, f"sqlite:///{tmp_path}/tasks.db")) as app:
        with app.client() as client:
            assert client.post("/task", json={"prompt": "no tuning"}).status_code == 200
        assert gc.get_threshold() == thresholds
        assert gc.get_freeze_count() == frozen


def test_the_served_app_tunes_the_collector_after_startup_completes() -> None:
    thresholds = gc.get_threshold()
    seen_before_complete: list[tuple[int, int, int]] = []

    async def app(scope: dict, receive, send) -> None:  # an app with only a lifespan
        assert (await receive())["type"] == "lifespan.startup"
        seen_before_complete.append(gc.get_threshold())
        await send({"type": "lifespan.startup.complete"})

    async def start() -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "lifespan.startup"}

        async def send(message: dict) -> None:
            sent.append(message)

        await server._TuneGCAfterStartup(app)({"type": "lifespan"}, receive, send)
        return sent

    try:
        sent = asyncio.run(start())
        assert sent == [{"type": "lifespan.startup.complete"}]
        assert seen_before_complete == [thresholds]
        assert gc.get_threshold()[0] == server.YOUNG_GC_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_serve_says_where_it_serves(start_service: StartService) -> None:
    metrics_port = free_port()
    service = start_service(METRICS_PORT=str(metrics_port))
    logs = service.logs()
    assert f"serving on http://127.0.0.1:{service.port}" in logs
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in logs


def test_the_workers_are_forked_without_alembic(tmp_path: Path) -> None:
    """Migrations run in a child of their own: the master, and so every worker forked from it,
    never imports Alembic."""
    script = (
        "import sys\n"
        "from reasoning_agent import server\n"
        "from reasoning_agent.config import load_settings\n"
        "settings = load_settings()\n"
        "server.migrate(settings)\n"
        "server.recover(settings)\n"
        "server.create_served_app()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'mako'}))\n"
    )
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path}/tasks.db",
        "API_KEYS": "alice-key-0123456789abcdef",
        "LLM_PROVIDER": "mock",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
