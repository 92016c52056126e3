"""create_app(): the FastAPI application, with a lifespan that owns the process's services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware

from reasoning_agent import __version__
from reasoning_agent.api.deps import document_api_key
from reasoning_agent.api.middleware import (
    PUBLIC_PATHS,
    AuthMiddleware,
    RequestContextMiddleware,
    RequestLimitsMiddleware,
)
from reasoning_agent.api.routes import health, tasks, usage
from reasoning_agent.bearer import BearerVerifier
from reasoning_agent.config import Settings, load_settings
from reasoning_agent.errors import install_handlers
from reasoning_agent.keys import KeyRing
from reasoning_agent.observability import logs, metrics, telemetry
from reasoning_agent.runners import maintenance
from reasoning_agent.runners.inprocess import InProcessRunner
from reasoning_agent.services import Services, build_services
from reasoning_agent.storage.db import display_url

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; settings come from the environment unless given."""
    settings = settings or load_settings()
    logs.configure_logging(settings.log_level, secrets=settings.secret_values())
    keyring = KeyRing.from_settings(settings)
    bearer = BearerVerifier.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with build_services(settings) as services, _upkeep(services):
                app.state.services = services
                metrics.initialise(
                    keys=keyring.names,
                    provider=services.agent.provider.name,
                    model=services.agent.default_model,
                    store_error_mode=settings.rate_limit_on_store_error,
                )
                log.info(
                    "service started",
                    extra={
                        "version": __version__,
                        "provider": services.agent.provider.name,
                        "database": display_url(settings.database_url.get_secret_value()),
                        "shared_limits": services.limiter.shared,
                        "tracing": tracing,
                    },
                )
                yield
        finally:
            telemetry.shutdown_tracing()

    app = FastAPI(
        title="reasoning-agent",
        version=__version__,
        description="Prompt in, LLM answer out; every task stored; limits per API key.",
        lifespan=lifespan,
        # Tracing is ours (telemetry.setup_tracing, only when configured); FastAPI's own would
        # look up the global OpenTelemetry providers on every request to find them unset.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        middleware=[
            Middleware(RequestContextMiddleware),
            Middleware(AuthMiddleware, keyring=keyring, bearer=bearer),
            Middleware(RequestLimitsMiddleware, max_bytes=settings.max_body_bytes),
        ],
    )
    install_handlers(app)
    app.include_router(tasks.router)
    app.include_router(usage.router)
    app.include_router(health.router)
    app.include_router(health.probes)
    document_api_key(app, public=PUBLIC_PATHS, bearer=bearer is not None)
    tracing = telemetry.setup_tracing(app)
    return app


@asynccontextmanager
async def _upkeep(services: Services) -> AsyncIterator[None]:
    """While the app serves: resume this process's queued tasks, sweep, purge; on the way out,
    drain the in-process runner."""
    settings = services.settings
    if isinstance(services.runner, InProcessRunner):
        resumed = await services.tasks.resume()
        if resumed:
            log.info("resumed background tasks", extra={"tasks": resumed})
    loops = [maintenance.sweep_forever(services.tasks)]
    if settings.retention_days is not None:
        loops.append(
            maintenance.purge_forever(
                services.database,
                days=settings.retention_days,
                interval_s=settings.retention_interval_s,
            )
        )
    running = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(services.runner, InProcessRunner):
            # A rollout must not fail what this process was running: the next one runs it.
            stopped = await services.runner.drain(settings.background_drain_s)
            requeued = await services.tasks.repository.requeue(stopped)
            if requeued:
                log.info("background tasks queued again", extra={"tasks": requeued})
