"""The `reasoning-agent` command: `serve` (gunicorn + uvicorn workers, or `--reload`) and `migrate`."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from reasoning_agent.config import ConfigError, Settings, load_settings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reasoning-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument(
        "--reload", action="store_true", help="one uvicorn process, reload on change"
    )
    serve.add_argument(
        "--no-migrate", action="store_true", help="do not apply migrations before serving"
    )
    commands.add_parser("worker", help="run background tasks from the Redis queue (arq)")
    migrate = commands.add_parser("migrate", help="apply the database migrations")
    migrate.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="keep trying this long while the database is not reachable yet",
    )
    args = parser.parse_args(argv)
    if args.command == "serve" and not args.reload:
        _prepare_metrics_dir()  # before anything imports prometheus_client

    try:
        if args.command == "migrate":
            _migrate(load_settings(), wait_s=args.wait)
            return 0
        if args.command == "worker":
            _work(load_settings())
            return 0
        settings = _checked_settings()
        if not args.no_migrate:
            _migrate(settings)
        _recover(settings)
        if args.reload:
            _serve_reload(settings)
        else:
            _serve_gunicorn(settings)
    except ConfigError as exc:
        print(f"reasoning-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _checked_settings() -> Settings:
    """Settings plus the checks that need more than the environment: key files, provider names."""
    from reasoning_agent.keys import KeyRing
    from reasoning_agent.llm import provider_names
    from reasoning_agent.telemetry import check_tracing_config

    settings = load_settings()
    KeyRing.from_settings(settings)
    check_tracing_config()
    if settings.metrics_port is not None and settings.metrics_port == settings.port:
        raise ConfigError("METRICS_PORT: must differ from PORT")
    if settings.llm_provider not in provider_names():
        raise ConfigError(
            f"LLM_PROVIDER: unknown provider {settings.llm_provider!r}; "
            f"installed: {', '.join(provider_names())}"
        )
    return settings


def _migrate(settings: Settings, *, wait_s: float = 0) -> None:
    """Apply migrations; with `wait_s`, retry while the database is still coming up."""
    from reasoning_agent import db

    url = settings.database_url.get_secret_value()
    give_up = time.monotonic() + wait_s
    while True:
        try:
            db.migrate(url)
            return
        except Exception as exc:
            reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if time.monotonic() >= give_up:
                raise ConfigError(
                    f"DATABASE_URL: cannot migrate {db.display_url(url)}: {reason}"
                ) from None
            print(f"reasoning-agent: waiting for the database: {reason}", file=sys.stderr)
            time.sleep(2)


def _work(settings: Settings) -> None:
    """`reasoning-agent worker`: arq workers take background tasks off Redis until SIGTERM."""
    from arq.worker import Worker

    from reasoning_agent import jobs, logs, telemetry
    from reasoning_agent.app import secrets_of

    if settings.redis_url is None:
        raise ConfigError(
            "REDIS_URL: the worker takes tasks from Redis; without it, serve runs them"
        )
    logs.configure_logging(settings.log_level, secrets=secrets_of(settings))
    telemetry.check_tracing_config()
    Worker(**jobs.worker_settings(settings)).run()


def _recover(settings: Settings) -> None:
    """Before serving: tasks left pending by a process that died are failed, never stuck."""
    import asyncio

    from reasoning_agent import db, jobs, tasks

    async def run() -> int:
        database = db.Database(settings.database_url.get_secret_value())
        try:
            async with database.sessions() as session:
                # Older than the deadline: no live process of any replica can still answer them.
                return await tasks.fail_interrupted(
                    session, **jobs.horizons(settings.llm_timeout_s, arq=settings.uses_arq)
                )
        finally:
            await database.aclose()

    try:
        failed = asyncio.run(run())
    except Exception as exc:
        raise ConfigError(f"DATABASE_URL: cannot check for interrupted tasks: {exc}") from None
    if failed:
        print(f"reasoning-agent: marked {failed} interrupted task(s) as failed", file=sys.stderr)


def _serve_reload(settings: Settings) -> None:
    import uvicorn

    from reasoning_agent.logs import logging_config

    uvicorn.run(
        "reasoning_agent.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        reload=True,
        reload_dirs=[str(Path(__file__).parent)],
        log_config=logging_config(settings.log_level),
        access_log=False,
    )


def _serve_metrics(host: str, port: int) -> None:
    """The metrics text, without a key, on its own port (for in-cluster scraping)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def _prepare_metrics_dir() -> None:
    """One empty metrics directory for all workers. prometheus_client reads the variable when it
    is first imported, so this runs before any module of ours is."""
    assert "prometheus_client" not in sys.modules, "prometheus_client was imported too early"
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        Path(metrics_dir).mkdir(parents=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="reasoning-agent-metrics-")


def _check_port_free(host: str, port: int) -> None:
    """Fail at once if the port is taken: with a socket per worker, gunicorn itself would only
    respawn workers that cannot bind, forever."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"PORT: cannot listen on {host}:{port}: {exc.strerror}") from None


def _serve_gunicorn(settings: Settings) -> None:
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]

    from gunicorn.app.base import BaseApplication

    from reasoning_agent.logs import logging_config

    def child_exit(_server: Any, worker: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    def when_ready(_server: Any) -> None:
        if settings.metrics_port is not None:
            _serve_metrics(settings.host, settings.metrics_port)

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    options: dict[str, Any] = {
        "bind": f"{host}:{settings.port}",
        "workers": settings.workers,
        "worker_class": "uvicorn_worker.UvicornWorker",
        "graceful_timeout": math.ceil(settings.llm_timeout_s) + 5,
        "timeout": 30,
        "keepalive": 5,
        # Each worker listens on its own SO_REUSEPORT socket and the kernel spreads new
        # connections evenly. On one shared socket whichever worker wakes first accepts a whole
        # burst: 1000 connections at once split up to 78/22 and the busier worker set the pace.
        "reuse_port": True,
        "accesslog": None,
        "logconfig_dict": logging_config(settings.log_level),
        "control_socket_disable": True,
        "child_exit": child_exit,
        "when_ready": when_ready,
        "proc_name": "reasoning-agent",
    }

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from reasoning_agent.app import create_app

            return create_app()

    try:
        _check_port_free(settings.host, settings.port)
        _Gunicorn().run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
