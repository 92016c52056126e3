"""Helpers for the deployment tests: the tools they need, rendering the chart, a Docker engine
and the stand-in base image."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from tests.support import REPO

CHART = REPO / "charts" / "reasoning-agent"
KUBE_VERSION = "1.35.0"


def missing(message: str) -> NoReturn:
    """Skip a test whose tool is absent, on a laptop; fail it in CI, which must run them all."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI must run every test")
    pytest.skip(message)


def tool(name: str) -> str:
    """The path of a tool that `make tools` installs; skip on a laptop without it, fail in CI."""
    found = shutil.which(name, path=f"{REPO}/.tools/bin:{REPO}/.venv/bin:{os.environ['PATH']}")
    if found:
        return found
    missing(f"{name} is not installed (make tools installs it)")


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


BASE_IMAGE = "python:3.12-slim"
KIT = REPO.parent / "shared" / "k8s"


def kit_script(name: str) -> Path:
    """A script of the offline Kubernetes kit beside the checkout; skip without it (or root),
    fail in CI."""
    script = KIT / name
    if script.exists() and os.geteuid() == 0:
        return script
    missing(f"{script} is missing or needs root")


def docker(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    return run(tool("docker"), *args, check=check, timeout=timeout, env=env)


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """A Docker engine: the running one, or one started here and stopped at the end."""
    tool("docker")
    if docker("info", check=False).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine runs, and starting one needs root")
    dockerd = tool("dockerd")
    workdir = Path(tempfile.mkdtemp(prefix="dockerd-"))
    log = (workdir / "dockerd.log").open("wb")
    process = subprocess.Popen(
        [
            dockerd,
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--pidfile",
            str(workdir / "dockerd.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while docker("info", check=False).returncode != 0:
        if time.monotonic() > deadline or process.poll() is not None:
            pytest.fail(f"dockerd did not start:\n{(workdir / 'dockerd.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield
    process.terminate()
    process.wait(timeout=60)
    log.close()
    shutil.rmtree(workdir, ignore_errors=True)


def stand_in_base_image() -> None:
    """Import a Debian rootfs with Python as python:3.12-slim (the official one is Debian too)."""
    debootstrap = tool("debootstrap")
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-"))
    try:
        run(
            debootstrap,
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates",
            "trixie",
            str(rootfs),
        )
        for name in ("python", "python3", "pip", "pip3"):
            target = "/usr/bin/python3" if name.startswith("python") else "/usr/bin/pip3"
            link = rootfs / "usr/local/bin" / name
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        # This machine's package traffic is TLS-intercepted: trust its CAs inside the stand-in.
        for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
        run("chroot", str(rootfs), "update-ca-certificates")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [
                tool("docker"),
                "import",
                "-c",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-c",
                "ENV LANG=C.UTF-8",
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
            timeout=300,
        )
        tar.wait(timeout=60)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def compose_env(profile: str) -> str:
    """The .env a user makes from .env.example; for the postgres profile, with the three lines
    it says to uncomment."""
    text = (REPO / ".env.example").read_text()
    if profile == "postgres":
        text = re.sub(
            r"^# (COMPOSE_PROFILES|POSTGRES_PASSWORD|DATABASE_URL)=", r"\1=", text, flags=re.M
        )
    return text
