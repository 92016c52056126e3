"""What a provider is: the request it takes, the result or error it gives, the span of a call."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from opentelemetry.trace import Span, SpanKind

from reasoning_agent.config import Settings
from reasoning_agent.observability.telemetry import capture_content, span
from reasoning_agent.tasks.status import ErrorType

__all__ = [
    "AnswerTooLarge",
    "DeadlineExceeded",
    "Delta",
    "LLMError",
    "LLMProvider",
    "LLMRequest",
    "LLMResult",
    "MalformedAnswer",
    "NoAnswer",
    "NotConfigured",
    "OnDelta",
    "ProviderFactory",
    "StreamBroken",
    "StreamingProvider",
    "UpstreamError",
    "UpstreamUnreachable",
    "attempt_span",
    "record_result",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMRequest:
    """What the agent asks of a provider."""

    messages: list[dict[str, str]]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    # A reasoning model (REASONING_MODELS): its output limit is `max_completion_tokens`.
    reasoning_model: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMResult:
    """A provider's answer and what it cost."""

    answer: str
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    reasoning: str | None = None  # reasoning text the upstream sent beside the answer
    reasoning_tokens: int | None = None  # part of completion_tokens


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer, or of the reasoning, as the upstream streams it."""

    text: str = ""
    reasoning: str = ""


OnDelta = Callable[[Delta], Awaitable[None]]


@dataclass(kw_only=True)
class LLMError(Exception):
    """A call that produced no answer; `attempts` says how many calls were made. The class
    is the classification: `code` is what the task records, `outcome` what a metric counts."""

    code: ClassVar[ErrorType] = ErrorType.UPSTREAM_ERROR
    outcome: ClassVar[str] = "error"

    message: str
    attempts: int = 0

    def __str__(self) -> str:
        return self.message


class UpstreamError(LLMError):
    """The upstream refused, failed, or kept failing until the attempts ran out."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream (a name that does not resolve, a refused or dropped
    connection) until the attempts ran out."""

    code = ErrorType.CONNECTION_ERROR
    outcome = "connection_error"


class StreamBroken(UpstreamError):
    """The upstream failed after a part of the answer had been passed on: not retried, since
    the caller has seen it."""

    outcome = "stream_broken"


class MalformedAnswer(UpstreamError):
    """The upstream answered with something that is not JSON."""

    outcome = "malformed"


class NoAnswer(UpstreamError):
    """The upstream answered JSON without an answer in it."""

    outcome = "no_answer"


class AnswerTooLarge(UpstreamError):
    """The upstream's answer was larger than LLM_MAX_RESPONSE_BYTES; reading stopped there."""

    outcome = "too_large"


class DeadlineExceeded(LLMError):
    """The overall deadline (LLM_TIMEOUT_S) passed before an answer came."""

    code = ErrorType.DEADLINE_EXCEEDED
    outcome = "timeout"


class NotConfigured(LLMError):
    """The provider lacks what it needs (an API key, say), so no call was made."""

    code = ErrorType.UNAVAILABLE
    outcome = "not_configured"


@runtime_checkable
class LLMProvider(Protocol):
    """What a plugin implements."""

    name: str
    default_model: str

    def unconfigured_reason(self) -> str | None:
        """Why this provider cannot be called now, or None when it can."""
        ...

    async def complete(self, request: LLMRequest, *, deadline: float) -> LLMResult:
        """Answer `request` before `deadline` (a `time.monotonic()` value) or raise LLMError."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamingProvider(LLMProvider, Protocol):
    """A provider that can pass the answer on as it arrives; the agent streams any other
    provider's answer as one piece."""

    async def stream(self, request: LLMRequest, *, deadline: float, on_delta: OnDelta) -> LLMResult:
        """As `complete`, awaiting `on_delta` for each piece first; retries only before the
        first piece (after it, StreamBroken)."""
        ...


ProviderFactory = Callable[[Settings], LLMProvider]


@contextmanager
def attempt_span(provider: str, request: LLMRequest, attempt: int) -> Iterator[Span]:
    """One span per call to the model, with the OpenTelemetry GenAI attributes."""
    with span(f"chat {request.model}", kind=SpanKind.CLIENT) as current:
        if current.is_recording():
            current.set_attribute("gen_ai.operation.name", "chat")
            current.set_attribute("gen_ai.provider.name", provider)
            current.set_attribute("gen_ai.request.model", request.model)
            current.set_attribute("reasoning_agent.llm.attempt", attempt)
            if request.temperature is not None:
                current.set_attribute("gen_ai.request.temperature", request.temperature)
            if request.max_tokens is not None:
                current.set_attribute("gen_ai.request.max_tokens", request.max_tokens)
            if request.reasoning_effort is not None:
                current.set_attribute("openai.request.reasoning_effort", request.reasoning_effort)
            if capture_content():
                current.set_attribute("gen_ai.input.messages", json.dumps(request.messages))
        yield current


def record_result(current: Span, result: LLMResult) -> None:
    """Put the answer's model and token counts (and text, if captured) on an attempt span."""
    if not current.is_recording():
        return
    current.set_attribute("gen_ai.response.model", result.model)
    current.set_attribute("reasoning_agent.llm.outcome", "ok")
    if result.prompt_tokens is not None:
        current.set_attribute("gen_ai.usage.input_tokens", result.prompt_tokens)
    if result.completion_tokens is not None:
        current.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens)
    if result.reasoning_tokens is not None:
        current.set_attribute("gen_ai.usage.reasoning_tokens", result.reasoning_tokens)
    if capture_content():
        current.set_attribute(
            "gen_ai.output.messages", json.dumps([{"role": "assistant", "content": result.answer}])
        )
