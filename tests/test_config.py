"""Bad configuration stops `reasoning-agent serve` at once, with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from tests.support import ALICE, command, free_port

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic

GOOD = {"API_KEYS": f"alice:{ALICE}", "LLM_PROVIDER": "mock"}


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": os.environ["PATH"],
        "PORT": str(free_port()),
        "DATABASE_URL": f"sqlite:///{tmp_path}/tasks.db",
        **env,
    }
    return subprocess.run(
        [*command(), "serve"], env=full, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"API_KEYS": ""}, "API_KEYS"),
        ({"API_KEYS": None}, "API_KEYS"),
        ({"RATE_LIMIT": "abc"}, "RATE_LIMIT"),
        ({"QUERY_RATE_LIMIT": "10/fortnight"}, "QUERY_RATE_LIMIT"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"WORKERS": "two"}, "WORKERS"),
        ({"WORKERS": "2"}, "REDIS_URL"),
        ({"PORT": "99999"}, "PORT"),
        ({"LLM_TIMEOUT_S": "-1"}, "LLM_TIMEOUT_S"),
        ({"LLM_MAX_ATTEMPTS": "0"}, "LLM_MAX_ATTEMPTS"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"LLM_PROVIDER": "nope"}, "LLM_PROVIDER"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "DATABASE_URL"),
        ({"API_KEYS_FILE": "/nonexistent/keys"}, "API_KEYS_FILE"),
        ({"API_KEYS": "short"}, "API_KEYS"),
        ({"API_KEYS": f"a:{ALICE},a:{ALICE}x"}, "API_KEYS"),
        ({"API_KEYS": f"bad name:{ALICE}"}, "API_KEYS"),
        ({"ADMIN_KEYS": "alice,mallory"}, "ADMIN_KEYS"),
        ({"ADMIN_KEYS": "not a name"}, "ADMIN_KEYS"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_a_bad_setting_stops_the_start_with_one_line(
    env: dict[str, str | None], named: str, tmp_path: Path
) -> None:
    merged = {k: v for k, v in (GOOD | env).items() if v is not None}
    result = serve(merged, tmp_path)  # type: ignore[arg-type]
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reasoning-agent: configuration error: ")
    assert named in lines[0]
    assert ALICE not in result.stderr + result.stdout


def test_an_unreadable_keys_file_is_named(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{ALICE}\n")
    keys.chmod(0)
    if os.access(keys, os.R_OK):  # root reads anything; a directory is unreadable as a file
        keys.chmod(0o600)
        keys.unlink()
        keys.mkdir()
    result = serve({"API_KEYS_FILE": str(keys), "LLM_PROVIDER": "mock"}, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"reasoning-agent: configuration error: API_KEYS_FILE: cannot read {keys}: "
        + ("IsADirectoryError" if keys.is_dir() else "PermissionError")
    ]


def test_migrate_creates_the_schema_and_needs_no_api_key(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": f"sqlite:///{tmp_path}/new/t.db"}
    result = subprocess.run(
        [*command(), "migrate"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "new" / "t.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"tasks", "alembic_version"} <= tables
    config = Config()
    config.set_main_option("script_location", "reasoning_agent:migrations")
    assert version == (ScriptDirectory.from_config(config).get_current_head(),)


@pytest.mark.parametrize("step", ["migrate", "serve"])
def test_migrate_wait_retries_then_fails_visibly(step: str) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": f"postgresql://u:pw-42@127.0.0.1:{free_port()}/x",
        "API_KEYS": "alice-key-0123456789abcdef",
        "LLM_PROVIDER": "mock",
    }
    started = time.monotonic()
    result = subprocess.run(
        [*command(), step, "--wait", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 3 <= time.monotonic() - started < 20
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("reasoning-agent: waiting for the database: ")
    assert lines[-1].startswith(
        "reasoning-agent: configuration error: DATABASE_URL: cannot migrate "
    )
    assert "pw-42" not in result.stderr


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helm and compose files often render a variable empty rather than leave it out."""
    from reasoning_agent.config import load_settings

    for name in ("REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "METRICS_PORT", "LOG_LEVEL"):
        monkeypatch.setenv(name, "")
    settings = load_settings()
    assert settings.redis_url is None
    assert settings.openai_api_key is None
    assert settings.openai_base_url is None
    assert settings.metrics_port is None
    assert settings.log_level == "INFO"
