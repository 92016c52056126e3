"""The LLM plugin interface: a provider turns messages into an answer; providers are found by name.

A separate package adds a provider by declaring, in its own pyproject.toml::

    [project.entry-points."reasoning_agent.providers"]
    myllm = "my_package:from_settings"   # a callable (Settings) -> LLMProvider
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from opentelemetry.trace import Span, SpanKind

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.telemetry import capture_content, span

__all__ = [
    "DeadlineExceeded",
    "LLMError",
    "LLMProvider",
    "LLMRequest",
    "LLMResult",
    "NotConfigured",
    "UpstreamError",
    "attempt_span",
    "load_provider",
    "provider_names",
    "record_result",
]

ENTRY_POINT_GROUP = "reasoning_agent.providers"
_BUILTIN = {
    "openai": "reasoning_agent.llm.openai:from_settings",
    "mock": "reasoning_agent.llm.mock:from_settings",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMRequest:
    """What the agent asks of a provider."""

    messages: list[dict[str, str]]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMResult:
    """A provider's answer and what it cost."""

    answer: str
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int


@dataclass(kw_only=True)
class LLMError(Exception):
    """A call that produced no answer; `attempts` says how many calls were made."""

    message: str
    attempts: int = 0

    def __str__(self) -> str:
        return self.message


class UpstreamError(LLMError):
    """The upstream refused, failed, or kept failing until the attempts ran out."""


class DeadlineExceeded(LLMError):
    """The overall deadline (LLM_TIMEOUT_S) passed before an answer came."""


class NotConfigured(LLMError):
    """The provider lacks what it needs (an API key, say), so no call was made."""


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
    if capture_content():
        current.set_attribute(
            "gen_ai.output.messages", json.dumps([{"role": "assistant", "content": result.answer}])
        )


def _factories() -> dict[str, str | ProviderFactory]:
    found: dict[str, str | ProviderFactory] = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def provider_names() -> list[str]:
    return sorted(_factories())


def load_provider(settings: Settings) -> LLMProvider:
    """Build the provider named by LLM_PROVIDER, built in or installed as a plugin."""
    target = _factories().get(settings.llm_provider)
    if target is None:
        raise ConfigError(
            f"LLM_PROVIDER: unknown provider {settings.llm_provider!r}; "
            f"installed: {', '.join(provider_names())}"
        )
    factory = target if callable(target) else _resolve(target)
    return factory(settings)


def _resolve(spec: str) -> ProviderFactory:
    module, _, attr = spec.partition(":")
    factory: ProviderFactory = getattr(import_module(module), attr)
    return factory
