"""An offline provider: deterministic answers, marked as mock, for development and demos."""

from __future__ import annotations

import hashlib

from reasoning_agent.config import Settings
from reasoning_agent.llm.base import LLMRequest, LLMResult, attempt_span, record_result

__all__ = ["MockProvider", "from_settings"]


class MockProvider:
    """Answers without a network; the same prompt always gets the same answer."""

    name = "mock"
    default_model = "mock"

    def unconfigured_reason(self) -> str | None:
        return None

    async def complete(self, request: LLMRequest, *, deadline: float) -> LLMResult:
        with attempt_span(self.name, request, 1) as current:
            result = self._answer(request)
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
        return LLMResult(
            answer=answer,
            model="mock",
            prompt_tokens=sum(len(m["content"].split()) for m in request.messages),
            completion_tokens=len(answer.split()),
            attempts=1,
        )

    async def aclose(self) -> None:
        return None


def from_settings(settings: Settings) -> MockProvider:
    return MockProvider()
