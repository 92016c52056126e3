"""The app in this process: create_app's lifespan on an event loop in a thread, and sync httpx
clients that reach it through httpx.ASGITransport, with no server and no socket in between."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import anyio.from_thread
import httpx
from fastapi import FastAPI

from reasoning_agent.app import create_app
from reasoning_agent.config import Settings
from reasoning_agent.storage import db
from tests.support import ALICE


class _PortalTransport(httpx.BaseTransport):
    """A sync transport that hands each request to the ASGI app on the portal's loop."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, app: FastAPI) -> None:
        self._portal = portal
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def send() -> httpx.Response:
            forwarded = httpx.Request(
                request.method, request.url, headers=request.headers, content=body
            )
            response = await self._asgi.handle_async_request(forwarded)
            content = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return self._portal.call(send)


class InProcessApp:
    """The app of `settings`, started; `client()` gives sync clients that reach it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url.get_secret_value()
        self.app = create_app(settings)
        self._stack = contextlib.ExitStack()
        self._portal: anyio.from_thread.BlockingPortal | None = None

    def start(self, *, migrate: bool = True) -> InProcessApp:
        if migrate:
            db.migrate(self.database_url)  # as `reasoning-agent serve` does first
        self._portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        self._stack.enter_context(
            self._portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app))
        )
        return self

    def stop(self) -> None:
        self._stack.close()

    def run(self, coroutine_function: Any, *args: Any) -> Any:
        """Call an async function on the app's loop, e.g. to reach its services."""
        assert self._portal is not None, "start() the app first"
        return self._portal.call(coroutine_function, *args)

    @property
    def services(self) -> Any:
        return self.app.state.services

    def client(self, key: str | None = ALICE, **options: Any) -> httpx.Client:
        assert self._portal is not None, "start() the app first"
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(
            transport=_PortalTransport(self._portal, self.app),
            base_url="http://testserver",
            headers=headers,
            timeout=30,
            **options,
        )


def settings_for(env: Mapping[str, str]) -> Settings:
    """Settings from an environment mapping, as the service would read them from its own."""
    return Settings(**{name.lower(): value for name, value in env.items()})


@contextlib.contextmanager
def running(env: Mapping[str, str], *, migrate: bool = True) -> Iterator[InProcessApp]:
    app = InProcessApp(settings_for(env)).start(migrate=migrate)
    try:
        yield app
    finally:
        app.stop()
