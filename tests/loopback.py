"""An ASGI app served by uvicorn on 127.0.0.1, in a thread of the test process: the fakes' server."""

from __future__ import annotations

import threading
import time

import uvicorn
from starlette.types import ASGIApp

from tests.support import free_port, quiet_uvicorn


class LoopbackServer:
    """Serves `app` on a free loopback port from `start()` until `stop()`."""

    def __init__(self, app: ASGIApp) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        quiet_uvicorn()
        self._server.should_exit = True
        self._thread.join(timeout=10)
