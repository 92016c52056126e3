"""`reasoning-agent serve --reload`, and how the service answers when its database goes away."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartService
from tests.support import (
    ALICE,
    command,
    drop_postgres_database,
    free_port,
    postgres_database,
    redis_url,
)


def _mock_env(tmp_path: Path, port: int) -> dict[str, str]:
    """`serve` on 127.0.0.1:`port` (the default host) with the mock provider and SQLite."""
    return {
        "PATH": os.environ["PATH"],
        "API_KEYS": f"alice:{ALICE}",
        "LLM_PROVIDER": "mock",
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp_path}/tasks.db",
    }


def test_serve_reload_runs_one_uvicorn_process(tmp_path: Path) -> None:
    port = free_port()
    env = _mock_env(tmp_path, port)
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


def test_serve_refuses_a_port_already_taken(tmp_path: Path) -> None:
    """Each worker binds its own socket, so gunicorn alone would respawn them forever."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*command(), "serve"],
            env=_mock_env(tmp_path, port),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"PORT: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_every_worker_listens_on_its_own_socket(start_service: StartService) -> None:
    """SO_REUSEPORT: the kernel spreads new connections over the workers' sockets."""
    service = start_service(LLM_PROVIDER="mock", WORKERS="2", REDIS_URL=redis_url(db=9))
    deadline = time.monotonic() + 30
    while len(listeners(service.port)) < 2:  # the second worker may still be booting
        assert time.monotonic() < deadline, listeners(service.port)
        time.sleep(0.1)
    assert len(listeners(service.port)) == 2


def listeners(port: int) -> list[str]:
    """Listening sockets on the loopback port, from /proc/net/tcp."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [
        line
        for line in lines
        if line.split()[1] == f"0100007F:{port:04X}" and line.split()[3] == "0A"  # LISTEN
    ]
