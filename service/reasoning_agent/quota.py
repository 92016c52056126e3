"""Admission by a key's policy: its models and request limits checked and its tokens reserved
before a task is stored, in one decision; the reservation settled when the call ends."""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Literal

from limits import RateLimitItem

from reasoning_agent.errors import (
    ModelNotAllowed,
    RateLimited,
    ServiceUnavailable,
    TokenBudgetExceeded,
    TokenRateExceeded,
)
from reasoning_agent.llm.base import LLMResult
from reasoning_agent.observability import metrics
from reasoning_agent.observability.telemetry import span
from reasoning_agent.policies import Policies
from reasoning_agent.ratelimit import (
    Admission,
    Decision,
    RateLimiter,
    StoreUnavailable,
    TokenAsk,
    TokenDecision,
    WindowState,
)

__all__ = ["Admitted", "Quota", "estimate_tokens"]

log = logging.getLogger(__name__)

Scope = Literal["task", "query"]


def estimate_tokens(prompt: str, system: str | None, max_tokens: int) -> int:
    """What a call may cost at most: its input at three characters a token, and its output
    limit."""
    return math.ceil((len(prompt) + len(system or "")) / 3) + max_tokens


@dataclass(frozen=True, slots=True)
class Admitted:
    """A task let through: its id (its reservation's too), the model it may use, the output
    limit to send, the tokens reserved for it, and what the limit headers report."""

    task_id: str
    model: str
    max_tokens: int | None
    reserved_tokens: int | None
    headers: dict[str, str] = field(default_factory=dict)


class Quota:
    """Every limit decision a request meets, made by the caller's policy."""

    def __init__(
        self, *, limiter: RateLimiter, policies: Policies, default_max_tokens: int
    ) -> None:
        self.limiter = limiter
        self.policies = policies
        self._default_max_tokens = default_max_tokens

    async def check_queries(self, owner: str) -> Decision:
        """Count one read of `owner`'s; RateLimited when its query limits are full."""
        items = self.policies.of(owner).query_rate_limits
        admission = await self._decide("query", owner, items, None)
        return admission.requests

    async def admit(
        self,
        owner: str,
        *,
        model: str,
        prompt: str,
        system: str | None,
        max_tokens: int | None,
    ) -> Admitted:
        """Let one task of `owner`'s through, or raise why not: a model outside its list
        (403), full request limits or token windows without room for its estimate (429).
        Under token limits a request without `max_tokens` gets DEFAULT_MAX_TOKENS, so the
        reservation bounds what it can spend."""
        policy = self.policies.of(owner)
        if not policy.allows(model):
            allowed = ", ".join(sorted(policy.models or ()))
            raise ModelNotAllowed(
                f"key {owner!r} may not use model {model!r}; it may use {allowed}"
            )
        task_id = uuid.uuid4().hex
        ask = None
        if policy.token_windows:
            max_tokens = max_tokens or self._default_max_tokens
            ask = TokenAsk(
                id=task_id,
                tokens=estimate_tokens(prompt, system, max_tokens),
                windows=policy.token_windows,
            )
        admission = await self._decide("task", owner, policy.rate_limits, ask)
        if admission.reserved is not None:
            metrics.TOKENS_RESERVED.labels(owner).inc(admission.reserved)
        return Admitted(task_id, model, max_tokens, admission.reserved, admission.headers)

    async def _decide(
        self, scope: Scope, owner: str, items: list[RateLimitItem], ask: TokenAsk | None
    ) -> Admission:
        with span("rate_limit") as current:
            try:
                admission = await self.limiter.admit(scope, owner, items, ask)
            except StoreUnavailable:
                raise ServiceUnavailable(
                    "rate limits cannot be checked now (RATE_LIMIT_ON_STORE_ERROR=deny)"
                ) from None
            if current.is_recording():
                current.set_attribute("reasoning_agent.rate_limit.scope", scope)
                current.set_attribute("reasoning_agent.rate_limit.allowed", admission.allowed)
                current.set_attribute(
                    "reasoning_agent.rate_limit.remaining", admission.requests.remaining
                )
                current.set_attribute("reasoning_agent.key", owner)
        decision = admission.requests
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(owner, scope).inc()
            raise RateLimited(
                f"rate limit of {decision.limit} exceeded for key {owner!r}; "
                f"retry in {decision.retry_after}s",
                headers={"Retry-After": str(decision.retry_after), **admission.headers},
            )
        if admission.tokens is not None and not admission.tokens.allowed:
            raise _refusal(owner, admission.tokens, headers=admission.headers)
        return admission

    async def settle(
        self, owner: str, task_id: str, reserved: int | None, *, result: LLMResult | None
    ) -> None:
        """Settle a task's reservation: charged what the upstream reported (all of it when
        the upstream reported nothing), or, with no `result`, given back."""
        if reserved is None:
            return
        charge = 0
        if result is not None:
            reported = result.prompt_tokens is not None or result.completion_tokens is not None
            used = (result.prompt_tokens or 0) + (result.completion_tokens or 0)
            charge = used if reported else reserved
        held = await self.limiter.settle(owner, task_id, charge=charge)
        if held is None:
            return  # settled already, or gone with its window
        metrics.TOKENS_SETTLED.labels(owner).inc(charge)
        if charge > held:
            metrics.TOKENS_OVERSHOOT.labels(owner).inc(charge - held)
            log.warning(
                "task %s used %d tokens, %d more than it reserved", task_id, charge, charge - held
            )

    async def windows(self, owner: str) -> list[WindowState]:
        """Each of `owner`'s token windows: its limit, what it used and holds reserved now."""
        try:
            return await self.limiter.usage(owner, self.policies.of(owner).token_windows)
        except StoreUnavailable:
            raise ServiceUnavailable(
                "token usage cannot be read now: Redis is unreachable"
            ) from None


def _refusal(owner: str, tokens: TokenDecision, *, headers: dict[str, str]) -> RateLimited:
    """The 429 for a reservation that did not fit: Retry-After when it would fit later."""
    kind = tokens.kind
    metrics.TOKEN_LIMITED.labels(owner, kind).inc()
    refused = max(tokens.refused_by, key=lambda state: state.reset_at)
    what = "token budget" if kind == "token_budget" else "token rate limit"
    retry_after = tokens.retry_after
    error = TokenBudgetExceeded if kind == "token_budget" else TokenRateExceeded
    if retry_after is None:
        return error(
            f"this request would reserve {tokens.tokens} tokens, more than the {what} of "
            f"{refused.limit} per {refused.window.item.multiples} "
            f"{refused.window.item.GRANULARITY.name} allows key {owner!r}: lower max_tokens",
            headers=headers,
        )
    return error(
        f"the {what} of {refused.limit} tokens per {refused.window.item.multiples} "
        f"{refused.window.item.GRANULARITY.name} has {refused.remaining} left for key "
        f"{owner!r}, and this request would reserve {tokens.tokens}; retry in {retry_after}s",
        headers={"Retry-After": str(retry_after), **headers},
    )
