"""The ReasoningAgent: turns a task into messages, asks the provider, keeps the deadline."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from reasoning_agent.llm.base import (
    DeadlineExceeded,
    Delta,
    LLMError,
    LLMProvider,
    LLMRequest,
    LLMResult,
    NotConfigured,
    OnDelta,
    StreamingProvider,
    UpstreamError,
)
from reasoning_agent.observability.telemetry import span

__all__ = ["ReasoningAgent"]

log = logging.getLogger(__name__)

_GUARD_S = 0.5  # how long past the deadline a provider that ignores it may run before we cut it off


class ReasoningAgent:
    """Answers one prompt through one provider, within one overall deadline."""

    def __init__(
        self,
        provider: LLMProvider,
        *,
        timeout_s: float,
        reasoning_models: str = r"^(o[1-9]|gpt-5)",
    ) -> None:
        self.provider = provider
        self.timeout_s = timeout_s
        self._reasoning_models = re.compile(reasoning_models)

    def is_reasoning_model(self, model: str) -> bool:
        return self._reasoning_models.search(model) is not None

    def dropped_params(self, model: str, *, temperature: float | None) -> list[str]:
        """What a request for `model` asked for that the model does not take."""
        if temperature is not None and self.is_reasoning_model(model):
            return ["temperature"]
        return []

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
        reasoning_effort: str | None = None,
        on_delta: OnDelta | None = None,
    ) -> LLMResult:
        """The answer, or an LLMError that says why there is none. With `on_delta`, each piece
        of it is passed on as it arrives (from a provider that cannot stream, all at once)."""
        reason = self.provider.unconfigured_reason()
        if reason:
            raise NotConfigured(message=reason)
        model = model or self.provider.default_model
        dropped = self.dropped_params(model, temperature=temperature)
        request = LLMRequest(
            messages=self.build_messages(prompt, system),
            model=model,
            temperature=None if "temperature" in dropped else temperature,
            max_tokens=max_tokens,
            reasoning_effort=reasoning_effort,
            reasoning_model=self.is_reasoning_model(model),
        )
        deadline = time.monotonic() + self.timeout_s
        try:
            with span("agent.run") as current:
                if current.is_recording():
                    current.set_attribute("gen_ai.provider.name", self.provider.name)
                    current.set_attribute("gen_ai.request.model", request.model)
                async with asyncio.timeout(self.timeout_s + _GUARD_S):
                    if on_delta is None:
                        return await self.provider.complete(request, deadline=deadline)
                    if isinstance(self.provider, StreamingProvider):
                        return await self.provider.stream(
                            request, deadline=deadline, on_delta=on_delta
                        )
                    result = await self.provider.complete(request, deadline=deadline)
                    await on_delta(Delta(text=result.answer, reasoning=result.reasoning or ""))
                    return result
        except LLMError:
            raise
        except TimeoutError:
            raise DeadlineExceeded(message=f"no answer within {self.timeout_s:g}s") from None
        except Exception as exc:
            log.exception("provider %s failed unexpectedly", self.provider.name)
            raise UpstreamError(
                message=f"provider {self.provider.name} failed: {exc.__class__.__name__}"
            ) from None
