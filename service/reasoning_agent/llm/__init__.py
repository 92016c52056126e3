"""LLM providers behind one interface, and the agent that asks them within a deadline.

Plugins import what they implement from here: `LLMProvider`, `LLMRequest`, `LLMResult`, the
`LLMError` classes, and `attempt_span` / `record_result` for their traces.
"""

from reasoning_agent.llm.base import (
    AnswerTooLarge,
    DeadlineExceeded,
    Delta,
    LLMError,
    LLMProvider,
    LLMRequest,
    LLMResult,
    MalformedAnswer,
    NoAnswer,
    NotConfigured,
    OnDelta,
    StreamBroken,
    StreamingProvider,
    UpstreamError,
    UpstreamUnreachable,
    attempt_span,
    record_result,
)
from reasoning_agent.llm.registry import ENTRY_POINT_GROUP, load_provider, provider_names

__all__ = [
    "ENTRY_POINT_GROUP",
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
    "StreamBroken",
    "StreamingProvider",
    "UpstreamError",
    "UpstreamUnreachable",
    "attempt_span",
    "load_provider",
    "provider_names",
    "record_result",
]
