"""Shared fixtures: the fake OpenAI upstream, and factories for real service processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai import FakeOpenAI
from tests.inprocess import InProcessApp, running
from tests.support import (
    ALICE,
    BOB,
    OPENAI_KEY,
    Service,
    drop_database,
    new_database,
)

StartService = Callable[..., Service]


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(upstream: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The fake upstream with an empty script and no recorded requests."""
    upstream.reset()
    yield upstream
    upstream.reset()


def base_env(upstream: FakeOpenAI, database_url: str) -> dict[str, str]:
    return {
        "API_KEYS": f"alice:{ALICE},bob:{BOB}",
        "ADMIN_KEYS": "alice",  # alice reads /metrics; bob is a plain tenant
        "DATABASE_URL": database_url,
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_MODEL": "fake-model",
        "LLM_TIMEOUT_S": "10",
    }


def module_service(directory: str, **env: str) -> Any:
    """A module-scoped fixture: one service, the test defaults plus `env`, for a whole module.
    Assign it to the fixture's name: `service = module_service("faults", LLM_TIMEOUT_S="2")`."""

    @pytest.fixture(scope="module")
    def fixture(
        upstream: FakeOpenAI, database_url: str, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Service]:
        log_path = tmp_path_factory.mktemp(directory) / "service.log"
        service = Service(base_env(upstream, database_url) | env, log_path=log_path)
        service.start()
        try:
            yield service
        finally:
            service.stop()

    return fixture


@pytest.fixture
def start_service(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[StartService]:
    """Start `reasoning-agent serve` with the given environment on top of a test default."""
    started: list[Service] = []
    databases: list[str] = []

    def start(*, open_files: int | None = None, **env: str) -> Service:
        if "DATABASE_URL" not in env and not databases:
            databases.append(new_database(tmp_path))  # one per test, shared by its services
        merged = base_env(upstream, databases[0] if databases else "") | env
        log_path = tmp_path / f"service-{len(started)}.log"
        service = Service(merged, log_path=log_path, open_files=open_files)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()
    for url in databases:
        drop_database(url)


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database for a module's service: SQLite, or PostgreSQL in the `make test-postgres` pass."""
    url = new_database(tmp_path_factory.mktemp("db"))
    yield url
    drop_database(url)


def module_app(**env: str) -> Any:
    """A module-scoped fixture: the app in this process (tests/inprocess.py), the test defaults
    plus `env`, for a whole module. Assign it to the fixture's name, as with module_service."""

    @pytest.fixture(scope="module")
    def fixture(upstream: FakeOpenAI, database_url: str) -> Iterator[InProcessApp]:
        with running(base_env(upstream, database_url) | env) as app:
            yield app

    return fixture


_GENEROUS = {"RATE_LIMIT": "100000/minute", "QUERY_RATE_LIMIT": "100000/minute"}
# One service per module, for tests that do not change its settings: a real server, and the
# same app in this process for tests that need no socket.
shared_service = module_service("log", **_GENEROUS)
shared_app = module_app(**_GENEROUS)
