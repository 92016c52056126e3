"""Per-key rate limits on the `limits` library: in-process by default, shared through Redis."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from reasoning_agent import metrics

__all__ = ["Decision", "RateLimiter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check, with what the X-RateLimit-* headers report."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: int
    retry_after: int

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }


class RateLimiter:
    """A moving-window limiter; with Redis the window is one atomic script shared by every process."""

    def __init__(self, *, redis_url: str | None, key_prefix: str = "reasoning-agent") -> None:
        self._store: Storage | None = None
        self._shared: MovingWindowRateLimiter | None = None
        if redis_url:
            self._store = RedisStorage(
                f"async+{redis_url}",
                implementation="redispy",
                key_prefix=key_prefix,
                socket_connect_timeout=1.0,
                socket_timeout=1.0,
            )
            self._shared = MovingWindowRateLimiter(self._store)
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._store_failing = False

    @property
    def shared(self) -> bool:
        return self._shared is not None

    async def hit(self, scope: str, owner: str, items: list[RateLimitItem]) -> Decision:
        """Count one request of `owner` against every item; denied if any item is exhausted."""
        try:
            decision = await self._hit(self._shared or self._local, scope, owner, items)
        except Exception as exc:
            if self._shared is None:
                raise
            metrics.RATE_LIMIT_STORE_ERRORS.inc()
            if not self._store_failing:
                log.error("rate-limit store unreachable, limiting in-process: %s", exc)
                self._store_failing = True
            return await self._hit(self._local, scope, owner, items)
        if self._store_failing and self._shared is not None:
            log.info("rate-limit store reachable again")
            self._store_failing = False
        return decision

    async def check_store(self) -> bool | None:
        """True when the shared store answers, False when not, None when there is none."""
        if self._store is None:
            return None
        try:
            return bool(await self._store.check())
        except Exception:
            return False

    @staticmethod
    async def _hit(
        limiter: MovingWindowRateLimiter, scope: str, owner: str, items: list[RateLimitItem]
    ) -> Decision:
        tightest: Decision | None = None
        for item in items:
            allowed = await limiter.hit(item, scope, owner)
            stats = await limiter.get_window_stats(item, scope, owner)
            now = time.time()
            decision = Decision(
                allowed=allowed,
                limit=item.amount,
                remaining=max(0, stats.remaining),
                reset_at=math.ceil(stats.reset_time),
                retry_after=max(1, math.ceil(stats.reset_time - now)),
            )
            if not allowed:
                return decision
            if tightest is None or decision.remaining < tightest.remaining:
                tightest = decision
        assert tightest is not None
        return tightest
