"""Test helpers: a real `reasoning-agent serve` process, and the local Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432"

# Keys the tests use; long enough for the service's minimum.
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef0"
OPENAI_KEY = "sk-test-fake-openai-secret-4242424242"


# The database every integration test's service uses: `make test` runs the suite once with
# each (`make test-sqlite`, then `make test-postgres`, which sets TEST_DATABASE=postgresql).
TEST_DATABASE = os.environ.get("TEST_DATABASE", "sqlite")


def new_database(directory: Path) -> str:
    """An empty database for one service: a SQLite file in `directory`, or a fresh PostgreSQL
    database (drop it with `drop_database`)."""
    if TEST_DATABASE == "postgresql":
        return postgres_database()
    return f"sqlite:///{directory}/tasks.db"


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        drop_postgres_database(url)


def query(url: str, sql: str) -> list[tuple]:
    """Rows from the service's database, read directly, whichever database it is."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return db.execute(sql).fetchall()
    import asyncpg

    async def fetch() -> list[tuple]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


@contextlib.contextmanager
def write_lock(url: str) -> Iterator[None]:
    """Hold the database's write lock on the tasks table from outside the service while inside."""
    if url.startswith("sqlite"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.rollback()
            db.close()
        return
    import asyncpg

    held, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE tasks IN SHARE MODE")  # INSERT and UPDATE wait
                held.set()
                await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        if not held.wait(10):
            raise RuntimeError("could not lock the tasks table")
        yield
    finally:
        release.set()
        holder.join(timeout=30)


@contextlib.contextmanager
def cyclic_garbage(*prefixes: str) -> Iterator[list[str]]:
    """The types, from modules named by `prefixes`, of what was made inside and only the
    cyclic collector could free: a cycle a request makes stalls the workers later."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds, to name it
    found: list[str] = []
    try:
        yield found
        gc.collect()
        names = {f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage}
        found.extend(sorted(name for name in names if name.startswith(prefixes)))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def quiet_uvicorn() -> None:
    """Before a uvicorn server of the tests' own stops: an app built in this process set
    uvicorn's level to INFO with a handler on the stdout pytest had then, which may be closed
    by the time the server says goodbye (an xdist worker's last module)."""
    import logging

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need(service: str, host: str, port: int) -> None:
    """Skip on a laptop without `service`; in CI (CI=true) a missing service is a failure."""
    if reachable(host, port):
        return
    message = f"{service} is not reachable at {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI must run every test")
    pytest.skip(f"{message}; start it to run this test")


def _xdist_worker() -> int:
    """Which of pytest-xdist's workers runs this test (0 without xdist)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name.removeprefix("gw"))


def redis_url(db: int = 15) -> str:
    """A Redis database for tests, emptied first so earlier counters do not leak in; each
    xdist worker has its own (`db`, `db - 1`, ...), so parallel tests never share one."""
    need("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    db -= _xdist_worker()

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    client.close()
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def postgres_database() -> str:
    """A fresh, empty PostgreSQL database; its URL."""
    need("PostgreSQL", "127.0.0.1", 5432)
    import asyncpg

    name = f"ra_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(f"{POSTGRES_URL}/postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{POSTGRES_URL}/{name}"


def drop_postgres_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(f"{POSTGRES_URL}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def command() -> list[str]:
    """How to run the installed console script from this virtualenv."""
    script = Path(sys.executable).parent / "reasoning-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "reasoning_agent"]


class Service:
    """`reasoning-agent serve` as a real process on a free loopback port."""

    def __init__(
        self, env: Mapping[str, str], *, log_path: Path, open_files: int | None = None
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.open_files = open_files  # a soft open-file limit to start under, as a host may set
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "HOST": "127.0.0.1",
            "LOG_LEVEL": "INFO",
            **env,
            "PORT": str(self.port),
        }
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 60) -> Service:
        log = self.log_path.open("ab")
        args = [*command(), "serve"]
        if self.open_files is not None:
            args = ["sh", "-c", f'ulimit -Sn {self.open_files} && exec "$@"', "sh", *args]
        self.process = subprocess.Popen(
            args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service did not become ready:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=10)

    def restart(self) -> Service:
        self.stop()
        self.port = free_port()
        self.env["PORT"] = str(self.port)
        self.base_url = f"http://127.0.0.1:{self.port}"
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str | None = ALICE, **options: object) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **options)  # type: ignore[arg-type]


def which(tool: str) -> str | None:
    return shutil.which(tool)


def worker_pids(service: Service, route: str = "/task") -> set[int]:
    """The pids of the workers that logged an access line for `route`."""
    import json

    return {
        json.loads(line)["pid"]
        for line in service.logs().splitlines()
        if f'"route": "{route}"' in line
    }


def post_over_both_workers(
    service: Service, *, at_least: int, keys: tuple[str, ...] = (ALICE,), batch: int = 20
) -> list[httpx.Response]:
    """POST /task at least `at_least` times, each on its own connection and `batch` at once,
    until both workers have answered some (bounded at 30 batches)."""

    async def one(i: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            return await client.post(
                "/task",
                json={"prompt": f"spread {i}"},
                headers={"X-API-Key": keys[i % len(keys)]},
            )

    async def burst(start: int) -> list[httpx.Response]:
        return list(await asyncio.gather(*(one(start + i) for i in range(batch))))

    responses: list[httpx.Response] = []
    for _ in range(30):
        responses += asyncio.run(burst(len(responses)))
        if len(responses) >= at_least and len(worker_pids(service)) == 2:
            return responses
    raise AssertionError(f"only workers {worker_pids(service)} answered {len(responses)} requests")


class OwnPostgres:
    """A PostgreSQL server of the test's own on a free loopback port, which it may stop and
    start (the shared one must stay up for every other test)."""

    def __init__(self) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not binaries:
            need("PostgreSQL's pg_ctl", "127.0.0.1", 0)  # skips on a laptop, fails in CI
        self._bin = binaries[-1].parent
        self.port = free_port()
        # Not under pytest's tmp_path, which only root may enter: initdb runs as postgres.
        self._root = Path(tempfile.mkdtemp(prefix="reasoning-agent-pg-"))
        self._root.chmod(0o777)
        self._data = self._root / "pgdata"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres(
            str(self._bin / "initdb"),
            "-D",
            str(self._data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )

    def _as_postgres(self, *command: str, check: bool = True) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=check, capture_output=True, timeout=60)

    def start(self, *settings: str) -> OwnPostgres:
        """Start the server, with `settings` (`name=value`) on top of the test's own."""
        options = f"-p {self.port} -k {self._data} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {setting}" for setting in settings)
        self._as_postgres(
            str(self._bin / "pg_ctl"),
            "-D",
            str(self._data),
            "-o",
            options,
            "-w",
            "-l",
            str(self._data / "log"),
            "start",
        )
        return self

    def stop(self) -> None:
        """Stop at once, as a crash would; stopping a stopped server is no error."""
        pg_ctl = str(self._bin / "pg_ctl")
        self._as_postgres(pg_ctl, "-D", str(self._data), "-m", "immediate", "stop", check=False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)


def wait_for(client: httpx.Client, task_id: str, statuses: set[str], timeout: float = 30) -> dict:
    """The task once it is in one of `statuses`, read every 0.1 s; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        task = client.get(f"/task/{task_id}").json()
        if task["status"] in statuses:
            return task
        assert time.monotonic() < deadline, f"task stayed {task['status']}"
        time.sleep(0.1)
