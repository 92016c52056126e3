"""The image, built and run for real: read-only root, uid 10001, data only on the /data volume;
and docker-compose.yml brought up with it, Redis and the worker.

No registry is reachable here, so when `python:3.12-slim` is absent a stand-in is made from
Debian with debootstrap (as root) and imported under that name. Docker runs with host
networking only, and every server binds 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.conftest import (
    BASE_IMAGE,
    compose_env,
    docker,
    docker_engine,
    kit_script,
    run,
    stand_in_base_image,
    tool,
)
from tests.support import ALICE, REPO, free_port

IMAGE = "reasoning-agent:test"


# A first build, with nothing cached (the stand-in base, then pip in the image), took over
# two minutes on a slower 2-core machine: more than the suite's per-test default.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    with docker_engine():
        yield


@pytest.fixture(scope="module")
def image(engine: None) -> Iterator[dict]:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        stand_in_base_image()
    started = time.monotonic()
    docker("build", "--network", "host", "--tag", IMAGE, str(REPO), timeout=900)
    built_s = time.monotonic() - started
    info = json.loads(docker("image", "inspect", IMAGE).stdout)[0]
    base = json.loads(docker("image", "inspect", BASE_IMAGE).stdout)[0]
    info["AddedSize"] = info["Size"] - base["Size"]
    print(
        f"\nimage {IMAGE}: {info['Size'] / 1e6:.1f} MB, of which {info['AddedSize'] / 1e6:.1f} MB "
        f"on top of {BASE_IMAGE}; built in {built_s:.0f} s"
    )
    yield info


class Container:
    """`docker run` the image as the chart runs it: read-only, uid 10001, tmpfs /tmp, /data volume."""

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.port = free_port()
        self.name = f"ra-test-{uuid.uuid4().hex[:8]}"
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Container:
        docker(
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--read-only",
            "--user",
            "10001",
            "--tmpfs",
            "/tmp",
            "--volume",
            f"{self.volume}:/data",
            "--env",
            "HOST=127.0.0.1",
            "--env",
            f"PORT={self.port}",
            "--env",
            f"API_KEYS=alice:{ALICE}",
            "--env",
            "LLM_PROVIDER=mock",
            IMAGE,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"container never became ready:\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        docker("rm", "--force", self.name, check=False)


def test_the_image_runs_read_only_as_10001_and_keeps_tasks_on_its_volume(image: dict) -> None:
    assert image["Config"]["User"] == "10001:10001"
    assert image["Config"]["Entrypoint"] == ["reasoning-agent"]
    assert image["Config"]["Cmd"] == ["serve"]
    assert "8000/tcp" in image["Config"]["ExposedPorts"]
    # What the dependencies weigh; cryptography, for bearer-token signatures, is 16 MB of it.
    assert image["AddedSize"] < 170e6, f"the image adds {image['AddedSize'] / 1e6:.0f} MB"

    volume = f"ra-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", volume)
    first = Container(volume)
    try:
        started = time.monotonic()
        first.start()
        print(f"container ready in {time.monotonic() - started:.1f} s")
        headers = {"X-API-Key": ALICE}
        health = httpx.get(f"{first.base_url}/healthz", headers=headers)
        assert health.status_code == 200, health.text
        assert health.json()["checks"]["database"] == "ok"
        task = httpx.post(
            f"{first.base_url}/task", json={"prompt": "in a container"}, headers=headers
        )
        assert task.status_code == 200, task.text
        assert task.json()["answer"].startswith("[mock answer")
        whoami = docker("exec", first.name, "python", "-c", "import os; print(os.getuid())")
        assert whoami.stdout.strip() == "10001"
        write = docker("exec", first.name, "python", "-c", "open('/app/x', 'w')", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr
        compilers = docker("exec", first.name, "sh", "-c", "command -v gcc cc", check=False)
        assert compilers.stdout.strip() == ""
        first.remove()

        second = Container(volume).start()
        try:
            items = httpx.get(f"{second.base_url}/query", headers=headers).json()["items"]
            assert [t["id"] for t in items] == [task.json()["id"]]
        finally:
            second.remove()
    finally:
        first.remove()
        docker("volume", "rm", "--force", volume, check=False)


REDIS_IMAGE = "redis:7.4-alpine"  # as docker-compose.yml names them
POSTGRES_IMAGE = "postgres:17-alpine"


@pytest.mark.parametrize("profile", ["", "postgres"], ids=["sqlite", "postgres profile"])
def test_docker_compose_serves_with_redis_and_a_worker_and_keeps_tasks(
    image: dict, tmp_path: Path, profile: str
) -> None:
    """`docker-compose up` of the repository's file, as a user runs it with an .env from
    .env.example (for PostgreSQL, its three lines uncommented): healthy services, a task
    answered, a background task done by the worker, and the tasks still there after `down`
    and `up`."""
    compose = tool("docker-compose")
    if docker("image", "inspect", REDIS_IMAGE, check=False).returncode != 0:
        run(str(kit_script("redis/make-redis-image.sh")), REDIS_IMAGE, timeout=600)
    if profile and docker("image", "inspect", POSTGRES_IMAGE, check=False).returncode != 0:
        run(str(REPO / ".ci" / "make-postgres-image.sh"), POSTGRES_IMAGE, timeout=600)
    docker("tag", IMAGE, "reasoning-agent:0.1.0")
    for name in ("docker-compose.yml", ".env.example"):
        shutil.copy(REPO / name, tmp_path / name)
    port = free_port()
    env_file = compose_env(profile)
    (tmp_path / ".env").write_text(f"{env_file}\nPORT={port}\n")
    key = next(
        line.split(":", 1)[1] for line in env_file.splitlines() if line.startswith("API_KEYS=")
    )
    project = f"ra-test-{uuid.uuid4().hex[:8]}"

    def up_and_down(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(compose, "-p", project, *args, cwd=tmp_path, timeout=timeout)

    base_url = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": key}
    try:
        started = time.monotonic()
        up_and_down("up", "-d", "--no-build")
        _wait_healthy(up_and_down, ["agent", "worker", "redis", *([profile] if profile else [])])
        print(f"compose healthy in {time.monotonic() - started:.1f} s")
        answered = httpx.post(f"{base_url}/task", json={"prompt": "composed"}, headers=headers)
        assert answered.status_code == 200, answered.text
        queued = httpx.post(
            f"{base_url}/task", json={"prompt": "by the worker", "mode": "async"}, headers=headers
        )
        assert queued.status_code == 202, queued.text
        done = _wait_finished(base_url, queued.json()["id"], headers)
        assert done["status"] == "completed" and done["answer"].startswith("[mock answer")
        assert "run_task" in up_and_down("logs", "worker").stdout  # the worker, not the agent

        up_and_down("down")
        up_and_down("up", "-d", "--no-build")
        _wait_healthy(up_and_down, ["agent"])
        items = httpx.get(f"{base_url}/query", headers=headers).json()["items"]
        assert {t["id"] for t in items} == {answered.json()["id"], queued.json()["id"]}
    finally:
        run(compose, "-p", project, "down", "-v", cwd=tmp_path, check=False, timeout=300)


def _wait_healthy(compose: Any, services: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ids = {s: compose("ps", "-q", s).stdout.strip() for s in services}
        states = {
            s: docker("inspect", "-f", "{{.State.Health.Status}}", i, check=False).stdout.strip()
            for s, i in ids.items()
        }
        if set(states.values()) == {"healthy"}:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not healthy: {states}\n{compose('logs').stdout[-4000:]}")
        time.sleep(1)


def _wait_finished(base_url: str, task_id: str, headers: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = httpx.get(f"{base_url}/task/{task_id}", headers=headers).json()
        if task["status"] in ("completed", "failed"):
            return task
        assert time.monotonic() < deadline, f"task stayed {task['status']}"
        time.sleep(0.3)
