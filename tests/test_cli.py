"""`reasoning-agent serve --reload`, and how the service answers when its database goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import StartService
from tests.support import ALICE, command, drop_postgres_database, free_port, postgres_database


def test_serve_reload_runs_one_uvicorn_process(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "API_KEYS": f"alice:{ALICE}",
        "LLM_PROVIDER": "mock",
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp_path}/tasks.db",
    }
    log = (tmp_path / "reload.log").open("wb")
    process = subprocess.Popen(
        [*command(), "serve", "--reload"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/task",
                    json={"prompt": "reload"},
                    headers={"X-API-Key": ALICE},
                )
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "reload.log").read_text()
                time.sleep(0.2)
        assert response.status_code == 200
        assert "gunicorn" not in (tmp_path / "reload.log").read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
        log.close()


def test_a_lost_database_answers_503_not_500(start_service: StartService) -> None:
    url = postgres_database()
    try:
        service = start_service(LLM_PROVIDER="mock", DATABASE_URL=url)
        with service.client() as client:
            assert client.post("/task", json={"prompt": "stored"}).status_code == 200
            drop_postgres_database(url)
            response = client.post("/task", json={"prompt": "nowhere to go"})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "database_unavailable"
            assert client.get("/query").status_code == 503
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "fail"
            assert client.get("/readyz").status_code == 503
            assert client.get("/livez").status_code == 200
        assert "Traceback" not in service.logs()
    finally:
        drop_postgres_database(url)
