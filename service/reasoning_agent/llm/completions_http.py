"""Chat-completion POSTs straight over aiohttp, streamed or not, failing with the SDK's own
exception classes: the SDK's request building and its httpx layer over the same aiohttp cost
more CPU than the call itself."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import aiohttp
import httpx2
import openai
from aiohttp.helpers import get_env_proxy_for_url
from openai._streaming import ServerSentEvent, SSEDecoder  # the SDK's own parser, as it reads
from yarl import URL

__all__ = ["CompletionsHTTP", "TooLarge"]


_READ = 2**16  # the most of a stream read at once, so one event's bytes are counted closely


class TooLarge(Exception):
    """The answer passed the byte cap (declared or received)."""


def _env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy HTTPS_PROXY or HTTP_PROXY names for `url` unless NO_PROXY exempts it, read
    once: aiohttp's `trust_env` reads them again on a thread for every request."""
    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


class CompletionsHTTP:
    """POSTs to `{base_url}chat/completions` with the SDK client's URL and identifying
    headers, streamed or not, on one session: one connection limit holds for all calls."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        api_key: str,
        max_connections: int,
        max_response_bytes: int,
    ) -> None:
        self._url = f"{client.base_url}chat/completions"
        self._headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
        self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._proxy, self._proxy_auth = _env_proxy(self._url)
        self._cap = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def post(
        self, body: Mapping[str, Any], *, timeout_s: float, headers: Mapping[str, str]
    ) -> bytes:
        """The 2xx answer's body. Otherwise openai.APIStatusError, APITimeoutError or
        APIConnectionError, the classes the retry policy reads, or TooLarge."""
        async with self._opened(body, timeout_s=timeout_s, headers=headers) as response:
            with self._as_sdk_errors():
                return await _read_capped(response, self._cap)

    @asynccontextmanager
    async def stream(
        self, body: Mapping[str, Any], *, timeout_s: float, headers: Mapping[str, str]
    ) -> AsyncIterator[AsyncIterator[object]]:
        """The decoded JSON of each event up to `[DONE]`, failing as `post` does; an event
        that carries an `error` is openai.APIError, as the SDK raises it, and one event past
        the byte cap TooLarge."""
        async with self._opened(body, timeout_s=timeout_s, headers=headers) as response:
            events = self._events(response)
            try:
                yield events
            finally:
                await events.aclose()

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[object, None]:
        unparsed = 0  # bytes read since the last event: an endless one is never buffered whole

        async def received() -> AsyncGenerator[bytes, None]:
            nonlocal unparsed
            async for chunk in response.content.iter_chunked(_READ):
                if unparsed > self._cap:  # what came before this read held no whole event
                    raise TooLarge
                unparsed += len(chunk)
                yield chunk

        chunks = received()
        events = cast(AsyncGenerator[ServerSentEvent, None], SSEDecoder().aiter_bytes(chunks))
        try:
            # Past the deadline the caller's own timeout stops the stream: aiohttp's own
            # TimeoutError is let through, as that deadline, not made an APITimeoutError.
            with self._as_sdk_errors(timeouts=False):
                async for event in events:
                    unparsed = 0
                    if event.data.startswith("[DONE]"):
                        async for _ in chunks:  # the rest, so that the connection is used again
                            pass
                        return
                    data = event.json()  # not JSON: ValueError, which the caller classifies
                    if isinstance(data, dict) and data.get("error"):
                        error = data["error"]
                        message = error.get("message") if isinstance(error, dict) else None
                        raise openai.APIError(
                            message if isinstance(message, str) and message else "stream error",
                            _request(self._url),
                            body=error,
                        )
                    yield data
        finally:
            await events.aclose()

    @asynccontextmanager
    async def _opened(
        self, body: Mapping[str, Any], *, timeout_s: float, headers: Mapping[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The 2xx response with its body unread, released on the way out."""
        sent = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        with self._as_sdk_errors():
            response = await self._session_here().post(
                self._url,
                data=sent,
                headers={**self._headers, **headers} if headers else self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            )
        try:
            if response.status >= 300:
                raise openai.APIStatusError(
                    f"Error code: {response.status}",
                    response=_as_httpx(response, self._url),
                    body=None,
                )
            yield response
        finally:
            response.release()

    @contextmanager
    def _as_sdk_errors(self, *, timeouts: bool = True) -> Iterator[None]:
        """aiohttp's failures as the SDK's classes, which the retry policy reads."""
        try:
            yield
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            if not timeouts:
                raise
            raise openai.APITimeoutError(request=_request(self._url)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise openai.APIConnectionError(request=_request(self._url)) from exc

    def _session_here(self) -> aiohttp.ClientSession:
        """The session, made on the loop that first calls."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                # The certificate store the SDK's own transport verifies with.
                ssl=httpx2.create_ssl_context(verify=True, trust_env=True),
            )
            self._session = aiohttp.ClientSession(
                connector=connector, proxy=self._proxy, proxy_auth=self._proxy_auth
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    if response.content_length is not None and response.content_length > cap:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _request(url: str) -> httpx2.Request:
    return httpx2.Request("POST", url)


def _as_httpx(response: aiohttp.ClientResponse, url: str) -> httpx2.Response:
    """The status and headers as the SDK's errors carry them (the body is never read)."""
    return httpx2.Response(
        response.status, headers=list(response.raw_headers), request=_request(url)
    )
