"""An offline provider: deterministic answers, marked as mock, for development and demos."""

from __future__ import annotations

import asyncio
import hashlib
import re

from reasoning_agent.config import Settings
from reasoning_agent.llm.base import (
    Delta,
    LLMRequest,
    LLMResult,
    OnDelta,
    attempt_span,
    record_result,
)

__all__ = ["MockProvider", "from_settings"]


class MockProvider:
    """Answers without a network; the same prompt always gets the same answer, streamed a
    word at a time after a short reasoning part."""

    name = "mock"
    default_model = "mock"

    def __init__(self, *, stream_delay_s: float = 0.02) -> None:
        self._stream_delay_s = stream_delay_s

    def unconfigured_reason(self) -> str | None:
        return None

    async def complete(self, request: LLMRequest, *, deadline: float) -> LLMResult:
        with attempt_span(self.name, request, 1) as current:
            result = self._answer(request)
            record_result(current, result)
            return result

    async def stream(self, request: LLMRequest, *, deadline: float, on_delta: OnDelta) -> LLMResult:
        with attempt_span(self.name, request, 1) as current:
            result = self._answer(request)
            assert result.reasoning is not None
            pieces = [Delta(reasoning=word) for word in _words(result.reasoning)]
            pieces += [Delta(text=word) for word in _words(result.answer)]
            for piece in pieces:
                await asyncio.sleep(self._stream_delay_s)
                await on_delta(piece)
            record_result(current, result)
            return result

    def _answer(self, request: LLMRequest) -> LLMResult:
        prompt = request.messages[-1]["content"]
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
        words = prompt.split()
        answer = (
            f"[mock answer {digest}] You asked {len(words)} words, beginning "
            f"{' '.join(words[:8])!r}. Set OPENAI_API_KEY for a real answer."
        )
        reasoning = f"The prompt has {len(words)} words; the mock answers them all alike."
        completion_tokens = len(answer.split()) + len(reasoning.split())
        return LLMResult(
            answer=answer,
            reasoning=reasoning,
            model="mock",
            prompt_tokens=sum(len(m["content"].split()) for m in request.messages),
            completion_tokens=completion_tokens,
            reasoning_tokens=len(reasoning.split()),
            attempts=1,
        )

    async def aclose(self) -> None:
        return None


def _words(text: str) -> list[str]:
    """`text` in pieces that join back to it: each word with the space before it."""
    return re.findall(r"\s*\S+", text)


def from_settings(settings: Settings) -> MockProvider:
    return MockProvider(stream_delay_s=settings.mock_stream_delay_ms / 1000)
