"""The ReasoningAgent: turns a task into messages, asks the provider, keeps the deadline."""

from __future__ import annotations

import asyncio
import logging
import time

from reasoning_agent.llm.base import (
    DeadlineExceeded,
    LLMError,
    LLMProvider,
    LLMRequest,
    LLMResult,
    NotConfigured,
    UpstreamError,
)
from reasoning_agent.observability.telemetry import span

__all__ = ["ReasoningAgent"]

log = logging.getLogger(__name__)

_GUARD_S = 0.5  # how long past the deadline a provider that ignores it may run before we cut it off


class ReasoningAgent:
    """Answers one prompt through one provider, within one overall deadline."""

    def __init__(self, provider: LLMProvider, *, timeout_s: float) -> None:
        self.provider = provider
        self.timeout_s = timeout_s

    @property
    def default_model(self) -> str:
        return self.provider.default_model

    def unconfigured_reason(self) -> str | None:
        return self.provider.unconfigured_reason()

    @staticmethod
    def build_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return messages

    async def run(
        self,
        prompt: str,
        *,
        system: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> LLMResult:
        """The answer, or an LLMError that says why there is none."""
        reason = self.provider.unconfigured_reason()
        if reason:
            raise NotConfigured(message=reason)
        request = LLMRequest(
            messages=self.build_messages(prompt, system),
            model=model or self.provider.default_model,
            temperature=temperature,
            max_tokens=max_tokens,
        )
        deadline = time.monotonic() + self.timeout_s
        try:
            with span("agent.run") as current:
                if current.is_recording():
                    current.set_attribute("gen_ai.provider.name", self.provider.name)
                    current.set_attribute("gen_ai.request.model", request.model)
                async with asyncio.timeout(self.timeout_s + _GUARD_S):
                    return await self.provider.complete(request, deadline=deadline)
        except LLMError:
            raise
        except TimeoutError:
            raise DeadlineExceeded(message=f"no answer within {self.timeout_s:g}s") from None
        except Exception as exc:
            log.exception("provider %s failed unexpectedly", self.provider.name)
            raise UpstreamError(
                message=f"provider {self.provider.name} failed: {exc.__class__.__name__}"
            ) from None
