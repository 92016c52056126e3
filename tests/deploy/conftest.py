"""Helpers for the deployment tests: the tools they need, and rendering the chart."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

CHART = REPO / "charts" / "reasoning-agent"
KUBE_VERSION = "1.35.0"


def tool(name: str) -> str:
    """The path of a tool that `make tools` installs; skip on a laptop without it, fail in CI."""
    found = shutil.which(name, path=f"{REPO}/.tools/bin:{REPO}/.venv/bin:{os.environ['PATH']}")
    if found:
        return found
    message = f"{name} is not installed (make tools installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI must run every test")
    pytest.skip(message)


def run(
    *args: str, check: bool = True, timeout: float = 300, **options: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **options
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(tool("helm"), *args, check=check)


def render_text(
    *values: str | Path, sets: dict[str, str] | None = None, release: str = "ra"
) -> str:
    args = ["template", release, str(CHART), "--kube-version", KUBE_VERSION]
    for file in values:
        args += ["-f", str(file)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return helm(*args).stdout


def render(
    *values: str | Path, sets: dict[str, str] | None = None, release: str = "ra"
) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(*values, sets=sets, release=release)) if d]


def render_error(*values: str | Path, sets: dict[str, str] | None = None) -> str:
    args = ["template", "ra", str(CHART)]
    for file in values:
        args += ["-f", str(file)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    result = helm(*args, check=False)
    assert result.returncode != 0, "the render should have failed"
    return result.stderr


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def app_deployment(docs: list[dict]) -> dict:
    return next(
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == "server"
    )


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def ci_values() -> list[Path]:
    return sorted((CHART / "ci").glob("*-values.yaml"))
