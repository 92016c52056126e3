"""The OpenAI provider: any OpenAI-compatible endpoint, one tenacity retry policy, every attempt logged."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2
import openai
from opentelemetry.trace import Span
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from reasoning_agent.config import Settings
from reasoning_agent.llm.base import (
    AnswerTooLarge,
    DeadlineExceeded,
    Delta,
    LLMError,
    LLMRequest,
    LLMResult,
    MalformedAnswer,
    NoAnswer,
    OnDelta,
    StreamBroken,
    UpstreamError,
    UpstreamUnreachable,
    attempt_span,
    record_result,
)
from reasoning_agent.llm.completions_http import CompletionsHTTP, TooLarge
from reasoning_agent.observability import metrics
from reasoning_agent.observability.telemetry import inject_headers

__all__ = ["OpenAIProvider", "from_settings"]

log = logging.getLogger(__name__)

_MAX_RETRY_AFTER_S = 60.0
_STREAMED = {"stream": True, "stream_options": {"include_usage": True}}


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt: rate limits, server errors, timeouts, dropped connections."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # includes APITimeoutError


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds the upstream asked us to wait, from Retry-After (seconds or HTTP date); None
    for anything else, `nan`, `inf` and negative numbers included."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    value = exc.response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _MAX_RETRY_AFTER_S)


def _timed_out(exc: BaseException) -> bool:
    """A timeout, not a failed connection: CompletionsHTTP raises APITimeoutError only for a
    TimeoutError."""
    return isinstance(exc, openai.APITimeoutError)


def _body(request: LLMRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "messages": request.messages}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_tokens is not None:
        # Reasoning models refuse `max_tokens`: their limit covers the reasoning too.
        limit = "max_completion_tokens" if request.reasoning_model else "max_tokens"
        body[limit] = request.max_tokens
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    return body


def _too_large(cap: int, attempts: int) -> AnswerTooLarge:
    return AnswerTooLarge(
        message=f"upstream answer is larger than {cap} bytes (LLM_MAX_RESPONSE_BYTES)",
        attempts=attempts,
    )


def _parse(body: bytes, *, model: str, attempts: int) -> LLMResult:
    """The answer in a chat completion; anything else is the upstream's fault (502)."""
    try:
        payload = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        raise MalformedAnswer(
            message="upstream sent a response that is not valid JSON", attempts=attempts
        ) from None
    try:
        message = payload["choices"][0]["message"]
        answer = message["content"]
    except (KeyError, IndexError, TypeError):
        message, answer = None, None
    if not isinstance(answer, str):
        raise NoAnswer(message="upstream returned no answer", attempts=attempts)
    reasoning = message.get("reasoning_content")  # DeepSeek-R1 and alike
    prompt_tokens, completion_tokens, reasoning_tokens = usage_of(payload)
    return LLMResult(
        answer=answer,
        model=_named(payload) or model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        reasoning_tokens=reasoning_tokens,
        reasoning=reasoning if isinstance(reasoning, str) and reasoning else None,
        attempts=attempts,
    )


def usage_of(payload: object) -> tuple[int | None, int | None, int | None]:
    """Prompt, completion and reasoning tokens as the upstream reported them (None where it
    did not); reasoning tokens are a part of the completion tokens."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None, None, None
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return (
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
        _count(reasoning),
    )


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, LLMError):
        return exc.outcome
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if _timed_out(exc):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    return exc.__class__.__name__


class _Wait:
    """Honour Retry-After when the upstream sends it, else exponential backoff with jitter."""

    def __init__(self) -> None:
        self._backoff = wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5)

    def __call__(self, state: RetryCallState) -> float:
        asked = _retry_after(state.outcome.exception() if state.outcome else None)
        return asked if asked is not None else self._backoff(state)


class _StopBefore(stop_base):
    """Give up when the next wait would end past the deadline."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() + state.upcoming_sleep >= self._deadline


class OpenAIProvider:
    """Chat completions at the SDK client's URL, with its headers and exception classes, under
    one tenacity retry policy."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        model: str,
        max_attempts: int,
        max_response_bytes: int = 8 * 2**20,
        max_connections: int = 10_000,
    ) -> None:
        self.default_model = model
        self._max_attempts = max_attempts
        self._max_response_bytes = max_response_bytes
        self._client: openai.AsyncOpenAI | None = None
        self._http: CompletionsHTTP | None = None
        if api_key:
            # The SDK's client settles the URL (OPENAI_BASE_URL too) and the identifying
            # headers; the calls go through CompletionsHTTP.
            self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0)
            self._http = CompletionsHTTP(
                self._client,
                api_key=api_key,
                max_connections=max_connections,
                max_response_bytes=max_response_bytes,
            )

    def unconfigured_reason(self) -> str | None:
        return None if self._client else "OPENAI_API_KEY is not set"

    async def complete(self, request: LLMRequest, *, deadline: float) -> LLMResult:
        assert self._client is not None, "complete() called on an unconfigured provider"
        return await self._retried(
            lambda number: self._attempt(request, number, deadline), deadline=deadline
        )

    async def stream(self, request: LLMRequest, *, deadline: float, on_delta: OnDelta) -> LLMResult:
        assert self._client is not None, "stream() called on an unconfigured provider"
        passed = _Passed(on_delta)
        return await self._retried(
            lambda number: self._attempt_stream(request, number, deadline, passed),
            deadline=deadline,
            again=lambda: not passed.chars and not passed.reasoning_chars,
        )

    async def _retried(
        self,
        attempt_number: Callable[[int], Awaitable[LLMResult]],
        *,
        deadline: float,
        again: Callable[[], bool] = lambda: True,
    ) -> LLMResult:
        """One call under the retry policy: transient failures are tried again while `again()`
        says so, within the attempts and the deadline."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: _is_transient(exc) and again()),
            wait=_Wait(),
            stop=stop_any(stop_after_attempt(self._max_attempts), _StopBefore(deadline)),
            reraise=True,
        )

        def attempts() -> int:
            return int(retrying.statistics["attempt_number"])

        async def attempt() -> LLMResult:  # a coroutine function, or tenacity will not await it
            return await attempt_number(attempts())

        try:
            return await retrying(attempt)
        except openai.APIError as exc:
            message = _describe(exc, attempts())
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(message=message, attempts=attempts()) from None
            if isinstance(exc, openai.APIConnectionError) and not _timed_out(exc):
                raise UpstreamUnreachable(message=message, attempts=attempts()) from None
            raise UpstreamError(message=message, attempts=attempts()) from None
        finally:
            # tenacity keeps the call's steps inside `retrying`: a cycle for the collector
            # unless it is broken here.
            retrying.iter_state.reset()

    async def _attempt(self, request: LLMRequest, number: int, deadline: float) -> LLMResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(message="deadline reached before the call", attempts=number - 1)
        assert self._http is not None
        started = time.monotonic()
        error: BaseException | None = None
        with attempt_span(self.name, request, number) as current:
            try:
                body = await self._http.post(
                    _body(request), timeout_s=remaining, headers=inject_headers()
                )
                result = _parse(body, model=request.model, attempts=number)
            except TooLarge:
                error = _too_large(self._max_response_bytes, number)
                raise error from None
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._note_attempt(current, request, number, error, started)
            record_result(current, result)
            return result

    def _note_attempt(
        self,
        current: Span,
        request: LLMRequest,
        number: int,
        error: BaseException | None,
        started: float,
        **extra: object,
    ) -> None:
        """Count and log one attempt (with `extra` fields), and mark its span if it failed."""
        outcome = _outcome(error)
        if error is not None and current.is_recording():
            current.set_attribute("reasoning_agent.llm.outcome", outcome)
        metrics.LLM_ATTEMPTS.labels(self.name, metrics.model_label(request.model), outcome).inc()
        log.info(
            "llm attempt",
            extra={
                "provider": self.name,
                "model": request.model,
                "attempt": number,
                "outcome": outcome,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                **extra,
            },
        )

    async def _attempt_stream(
        self, request: LLMRequest, number: int, deadline: float, passed: _Passed
    ) -> LLMResult:
        """One streamed call: each piece passed on as it comes, usage from the last chunk."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(message="deadline reached before the call", attempts=number - 1)
        assert self._http is not None
        started = time.monotonic()
        first_token_ms: float | None = None
        error: BaseException | None = None
        answer: list[str] = []
        reasoning: list[str] = []
        named = request.model
        usage: tuple[int | None, int | None, int | None] = (None, None, None)
        with attempt_span(self.name, request, number) as current:
            try:
                async with (
                    asyncio.timeout(remaining),
                    self._http.stream(
                        _body(request) | _STREAMED, timeout_s=remaining, headers=inject_headers()
                    ) as chunks,
                ):
                    async for chunk in _guarded(chunks, passed, number):
                        named = _named(chunk) or named
                        if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                            usage = usage_of(chunk)
                        delta = _delta_of(chunk)
                        if delta is None:
                            continue
                        if first_token_ms is None:
                            first_token_ms = round((time.monotonic() - started) * 1000, 1)
                            metrics.FIRST_TOKEN_SECONDS.labels(
                                self.name, metrics.model_label(request.model)
                            ).observe(first_token_ms / 1000)
                            if current.is_recording():
                                current.add_event("first_token")
                        answer.append(delta.text)
                        reasoning.append(delta.reasoning)
                        if passed.chars + passed.reasoning_chars > self._max_response_bytes:
                            raise _too_large(self._max_response_bytes, number)
                        await passed.forward(delta)
                if first_token_ms is None:
                    raise NoAnswer(message="upstream streamed no answer", attempts=number)
            except TooLarge:
                error = _too_large(self._max_response_bytes, number)
                raise error from None
            except TimeoutError:
                error = DeadlineExceeded(
                    message=f"upstream stream not finished by the deadline after {passed.chars}"
                    " characters",
                    attempts=number,
                )
                raise error from None
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._note_attempt(
                    current, request, number, error, started, first_token_ms=first_token_ms
                )
            prompt_tokens, completion_tokens, reasoning_tokens = usage
            result = LLMResult(
                answer="".join(answer),
                model=named,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                reasoning_tokens=reasoning_tokens,
                reasoning="".join(reasoning) or None,
                attempts=number,
            )
            record_result(current, result)
            return result

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._client is not None:
            await self._client.close()


class _Passed:
    """What a stream has passed on so far, across its attempts."""

    def __init__(self, on_delta: OnDelta) -> None:
        self._on_delta = on_delta
        self.chars = 0
        self.reasoning_chars = 0

    async def forward(self, delta: Delta) -> None:
        self.chars += len(delta.text)
        self.reasoning_chars += len(delta.reasoning)
        await self._on_delta(delta)


async def _guarded(
    chunks: AsyncIterator[object], passed: _Passed, number: int
) -> AsyncIterator[object]:
    """The chunks; a failure once something was passed on is StreamBroken (the caller has a
    part of the answer), before that one the retry policy knows."""
    try:
        async for chunk in chunks:
            yield chunk
    except (LLMError, TooLarge, TimeoutError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if passed.chars or passed.reasoning_chars:
            raise StreamBroken(
                message=f"upstream stream broke after {passed.chars} characters of the answer "
                f"({_outcome(exc)})",
                attempts=number,
            ) from None
        if isinstance(exc, openai.APIError):
            raise
        raise openai.APIConnectionError(
            message=f"stream dropped: {exc.__class__.__name__}",
            request=httpx2.Request("POST", "/chat/completions"),
        ) from exc


def _delta_of(chunk: object) -> Delta | None:
    """The answer and reasoning text in a chunk; None for chunks with neither (role, usage) and
    for anything not shaped as a chat completion chunk."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    piece = first.get("delta") if isinstance(first, dict) else None
    if not isinstance(piece, dict):
        return None
    text, reasoning = piece.get("content"), piece.get("reasoning_content")  # DeepSeek-R1 and alike
    text = text if isinstance(text, str) else ""
    reasoning = reasoning if isinstance(reasoning, str) else ""
    return Delta(text=text, reasoning=reasoning) if text or reasoning else None


def _named(chunk: object) -> str | None:
    """The model a chunk says answered, if it names one."""
    named = chunk.get("model") if isinstance(chunk, dict) else None
    return named if isinstance(named, str) and named else None


def _describe(exc: openai.APIError, attempts: int) -> str:
    tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(exc, openai.APIStatusError):
        return f"upstream answered HTTP {exc.status_code} {tries}"
    if _timed_out(exc):
        return f"upstream timed out {tries}"
    if isinstance(exc, openai.APIConnectionError):
        return f"upstream unreachable {tries}"
    return f"upstream error {exc.__class__.__name__} {tries}"


def from_settings(settings: Settings) -> OpenAIProvider:
    return OpenAIProvider(
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        base_url=settings.openai_base_url,
        model=settings.openai_model,
        max_attempts=settings.llm_max_attempts,
        max_response_bytes=settings.llm_max_response_bytes,
        max_connections=settings.llm_max_connections,
    )
