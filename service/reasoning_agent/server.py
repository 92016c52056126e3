"""Serving: migrations and recovery before start, gunicorn with a socket per uvicorn worker,
the metrics port, and the collector tuned for a long-lived server."""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reasoning_agent.config import ConfigError, Settings

__all__ = ["create_served_app", "migrate", "prepare_metrics_dir", "recover", "serve"]

YOUNG_GC_THRESHOLD = 20_000  # allocations between young collections (Python's default: 700)


def prepare_metrics_dir() -> None:
    """One empty metrics directory for all workers. prometheus_client reads the variable when it
    is first imported, so this runs before any module of ours is."""
    assert "prometheus_client" not in sys.modules, "prometheus_client was imported too early"
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        Path(metrics_dir).mkdir(parents=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="reasoning-agent-metrics-")


def migrate(settings: Settings, *, wait_s: float = 0) -> None:
    """Apply migrations; with `wait_s`, retry while the database is still coming up."""
    from reasoning_agent.storage import db

    url = settings.database_url.get_secret_value()
    give_up = time.monotonic() + wait_s
    while True:
        # In a child process, so the workers forked later do not carry Alembic's modules.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
            reason = child.submit(_migrate_or_why, url).result()
        if reason is None:
            return
        if time.monotonic() >= give_up:
            raise ConfigError(f"DATABASE_URL: cannot migrate {db.display_url(url)}: {reason}")
        print(f"reasoning-agent: waiting for the database: {reason}", file=sys.stderr)
        time.sleep(2)


def _migrate_or_why(url: str) -> str | None:
    """None once migrated, else why not (an exception may not survive the way back)."""
    from reasoning_agent.storage import db

    try:
        db.migrate(url)
    except Exception as exc:
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def recover(settings: Settings) -> None:
    """Before serving: the tasks of this host's processes that died are failed (a request's)
    or queued again (a background one's), never left stuck."""
    from reasoning_agent.storage.db import Database
    from reasoning_agent.tasks.repository import Swept, TaskRepository

    async def run() -> Swept:
        database = Database(settings.database_url.get_secret_value())
        try:
            return await TaskRepository(database).sweep()
        finally:
            await database.aclose()

    try:
        swept = asyncio.run(run())
    except Exception as exc:
        raise ConfigError(f"DATABASE_URL: cannot check for interrupted tasks: {exc}") from None
    if swept.failed:
        print(
            f"reasoning-agent: marked {swept.failed} interrupted task(s) as failed", file=sys.stderr
        )
    if swept.requeued:
        print(
            f"reasoning-agent: queued {swept.requeued} interrupted task(s) again", file=sys.stderr
        )


def serve(settings: Settings, *, reload: bool = False) -> None:
    """Serve until SIGTERM: gunicorn and its workers, or one reloading uvicorn process."""
    if reload:
        _serve_reload(settings)
    else:
        _serve_gunicorn(settings)


def create_served_app() -> ASGIApp:
    """The app as a server runs it: the collector is tuned once its lifespan has started."""
    from reasoning_agent.app import create_app

    return _TuneGCAfterStartup(create_app())


class _TuneGCAfterStartup:
    """Once startup built what lives as long as the process, tune the collector for serving:
    frozen, a full collection scans only what requests made; with young collections rarer,
    most of a request's objects are gone before one runs instead of being promoted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_then_tune(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
                gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
            await send(message)

        await self.app(scope, receive, send_then_tune)


def _protocol(settings: Settings) -> type[asyncio.Protocol]:
    """The HTTP protocol every port is served with, after raising the open-file limit."""
    from reasoning_agent.http_protocol import ConnectionLimits, protocol_with, raise_open_file_limit

    limits = ConnectionLimits(
        head_timeout_s=settings.head_timeout_s, max_connections=settings.max_connections
    )
    return protocol_with(limits, open_files=raise_open_file_limit())


def _serve_reload(settings: Settings) -> None:
    import uvicorn

    from reasoning_agent.observability.logs import logging_config

    uvicorn.run(
        "reasoning_agent.server:create_served_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        reload=True,
        reload_dirs=[str(Path(__file__).parent)],
        log_config=logging_config(settings.log_level),
        access_log=False,
        # The reloader starts the server in a fresh process: the guard by name, its defaults.
        http="reasoning_agent.http_protocol:GuardedHttpProtocol",
        timeout_keep_alive=math.ceil(settings.keepalive_s),
    )


def _metrics_listener(host: str, port: int) -> socket.socket:
    """This worker's socket on METRICS_PORT; SO_REUSEPORT, like gunicorn's own per worker."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(address)
    listener.listen(2048)
    listener.setblocking(False)
    return listener


class _MetricsOnItsPort:
    """Requests that came in on METRICS_PORT get the metrics of every worker, without a key,
    and nothing else; the rest go to the app."""

    def __init__(self, app: ASGIApp, *, port: int) -> None:
        from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        self.app, self.port, self.metrics = app, port, make_asgi_app(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] == self.port:
            await self.metrics(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _check_port_free(host: str, port: int, *, variable: str = "PORT") -> None:
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
        raise ConfigError(f"{variable}: cannot listen on {host}:{port}: {exc.strerror}") from None


def _serve_gunicorn(settings: Settings) -> None:
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]

    from gunicorn.app.base import BaseApplication

    from reasoning_agent.observability.logs import logging_config

    def child_exit(_server: Any, worker: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    from uvicorn_worker import UvicornWorker

    protocol = _protocol(settings)  # in the master: every worker inherits the file limit

    class Worker(UvicornWorker):  # type: ignore[misc]
        CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": protocol}

    def when_ready(server: Any) -> None:
        # gunicorn's own "Listening at" line is empty with a socket per worker.
        server.log.info("serving on http://%s:%d", host, settings.port)
        if settings.metrics_port is not None:
            server.log.info("metrics on http://%s:%d/metrics", host, settings.metrics_port)

    def post_fork(_server: Any, worker: Any) -> None:
        # Every worker serves the metrics port, with the main port's protocol and limits; no
        # thread in the master, whose forks would inherit its locks.
        if settings.metrics_port is not None:
            worker.sockets.append(_metrics_listener(settings.host, settings.metrics_port))

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    options: dict[str, Any] = {
        "bind": f"{host}:{settings.port}",
        "workers": settings.workers,
        "worker_class": Worker,
        # Requests in flight end by the deadline; in-process background tasks get their drain.
        "graceful_timeout": math.ceil(settings.llm_timeout_s + settings.background_drain_s) + 5,
        "timeout": 30,
        "keepalive": math.ceil(settings.keepalive_s),
        # A SO_REUSEPORT socket per worker lets the kernel spread new connections evenly; on
        # one shared socket whichever worker wakes first accepts a whole burst.
        "reuse_port": True,
        "accesslog": None,
        "logconfig_dict": logging_config(settings.log_level),
        "control_socket_disable": True,
        "child_exit": child_exit,
        "when_ready": when_ready,
        "post_fork": post_fork,
        "proc_name": "reasoning-agent",
    }

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            app = create_served_app()
            if settings.metrics_port is None:
                return app
            return _MetricsOnItsPort(app, port=settings.metrics_port)

    try:
        _check_port_free(settings.host, settings.port)
        if settings.metrics_port is not None:
            _check_port_free(settings.host, settings.metrics_port, variable="METRICS_PORT")
        _Gunicorn().run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
