"""Per-key rate limits: a sliding window log, decided in one atomic Redis script or in-process.

A key may make at most `amount` requests in any window of `seconds` (for `60/minute`: never a
61st within 60 s of the first). With Redis every worker of every replica shares one log per key
and limit: one Lua script trims it, counts it and, only if every limit has room, records the
request; Redis's own clock decides, so replicas with skewed clocks agree. The keys of one caller
share a hash tag, so the script also runs on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from itertools import count
from typing import Any, Literal

from limits import RateLimitItem
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from reasoning_agent.observability import metrics

__all__ = ["Decision", "LocalLimiter", "RateLimiter", "StoreUnavailable"]

log = logging.getLogger(__name__)

OnStoreError = Literal["local", "allow", "deny"]

# KEYS: one sorted set per limit. ARGV: amount and window (ms) per limit, then the request's id.
# Returns {allowed, remaining, reset_at_ms, retry_after_ms, index} for the tightest limit.
_SCRIPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local member = ARGV[#ARGV]
local allowed, retry = 1, 0
local counts = {}
for i = 1, #KEYS do
  local amount, window = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] >= amount then
    allowed = 0
    local frees = redis.call('ZRANGE', KEYS[i], counts[i] - amount, counts[i] - amount, 'WITHSCORES')
    retry = math.max(retry, tonumber(frees[2]) + window - now)
  end
end
local remaining, reset, tightest = -1, now, 1
for i = 1, #KEYS do
  local amount, window = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if allowed == 1 then
    redis.call('ZADD', KEYS[i], now, member)
    redis.call('PEXPIRE', KEYS[i], window)
    counts[i] = counts[i] + 1
  end
  local left = math.max(0, amount - counts[i])
  if remaining < 0 or left < remaining then
    remaining, tightest = left, i
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    reset = oldest[2] and (tonumber(oldest[2]) + window) or now
  end
end
return {allowed, remaining, reset, retry, tightest}
"""


class StoreUnavailable(Exception):
    """The shared store failed and RATE_LIMIT_ON_STORE_ERROR=deny."""


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


def _window_ms(item: RateLimitItem) -> int:
    return int(item.get_expiry() * 1000)


class LocalLimiter:
    """The same sliding window log in this process's memory; `share` divides every amount."""

    def __init__(self, *, share: int = 1) -> None:
        self._share = max(1, share)
        self._logs: dict[str, deque[float]] = {}

    def hit(self, scope: str, owner: str, items: list[RateLimitItem]) -> Decision:
        now = time.time() * 1000
        logs, allowed, retry = [], True, 0.0
        for item in items:
            amount, window = max(1, item.amount // self._share), _window_ms(item)
            entries = self._logs.setdefault(f"{scope}:{owner}:{item}", deque())
            while entries and entries[0] <= now - window:
                entries.popleft()
            if len(entries) >= amount:
                allowed = False
                retry = max(retry, entries[len(entries) - amount] + window - now)
            logs.append((amount, window, entries))
        tightest: Decision | None = None
        for amount, window, entries in logs:
            if allowed:
                entries.append(now)
            left = max(0, amount - len(entries))
            if tightest is None or left < tightest.remaining:
                reset = (entries[0] + window) if entries else now
                tightest = _decision(allowed, amount, left, reset, retry)
        assert tightest is not None
        return tightest


def _decision(
    allowed: bool, amount: int, remaining: int, reset_ms: float, retry_ms: float
) -> Decision:
    return Decision(
        allowed=allowed,
        limit=amount,
        remaining=remaining,
        reset_at=math.ceil(reset_ms / 1000),
        retry_after=0 if allowed else max(1, math.ceil(retry_ms / 1000)),
    )


class RateLimiter:
    """Decides in Redis when it has one; when Redis fails, as RATE_LIMIT_ON_STORE_ERROR says."""

    _RETRY_STORE_AFTER_S = 1.0

    def __init__(
        self,
        *,
        redis_url: str | None,
        on_store_error: OnStoreError = "local",
        local_share: int = 1,
        key_prefix: str = "ra",
    ) -> None:
        self._redis: Redis | None = None
        if redis_url:
            self._redis = Redis.from_url(
                redis_url, socket_connect_timeout=1.0, socket_timeout=1.0, decode_responses=False
            )
            self._script = _Pipelined(self._redis, _SCRIPT)
        self._on_store_error = on_store_error
        self._local = LocalLimiter()
        self._fallback = LocalLimiter(share=local_share)
        self._prefix = key_prefix
        self._ids = count()
        self._process = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._store_down_until = 0.0  # while Redis is failing, ask it again only this often
        self._incident = False

    @property
    def shared(self) -> bool:
        return self._redis is not None

    async def hit(self, scope: str, owner: str, items: list[RateLimitItem]) -> Decision:
        """Count one request of `owner` against every item; denied if any item is full."""
        if self._redis is None:
            return self._local.hit(scope, owner, items)
        if time.monotonic() >= self._store_down_until:
            try:
                decision = await self._shared_hit(scope, owner, items)
            except Exception as exc:
                self._store_down_until = time.monotonic() + self._RETRY_STORE_AFTER_S
                if not self._incident:
                    self._incident = True
                    log.error(
                        "rate-limit store unreachable, limits now %s: %s",
                        self._on_store_error,
                        exc.__class__.__name__,
                    )
            else:
                if self._incident:
                    self._incident = False
                    log.info("rate-limit store reachable again")
                return decision
        metrics.RATE_LIMIT_STORE_ERRORS.labels(self._on_store_error).inc()
        if self._on_store_error == "deny":
            raise StoreUnavailable("the rate-limit store is unreachable")
        if self._on_store_error == "allow":
            return Decision(True, items[0].amount, items[0].amount, math.ceil(time.time()), 0)
        return self._fallback.hit(scope, owner, items)

    async def _shared_hit(self, scope: str, owner: str, items: list[RateLimitItem]) -> Decision:
        tag = f"{self._prefix}:{{{scope}:{owner}}}"  # one hash slot per caller and scope
        keys = [f"{tag}:{item.amount}/{item.get_expiry()}" for item in items]
        args: list[str] = []
        for item in items:
            args += [str(item.amount), str(_window_ms(item))]
        args.append(f"{self._process}-{next(self._ids)}")
        allowed, remaining, reset_ms, retry_ms, tightest = await self._script(keys, args)
        limit = items[int(tightest) - 1].amount
        return _decision(bool(allowed), limit, int(remaining), float(reset_ms), float(retry_ms))

    async def check_store(self) -> bool | None:
        """True when Redis answers, False when not, None when there is none."""
        if self._redis is None:
            return None
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


_Call = tuple[list[str], list[str], "asyncio.Future[Any]"]


class _Pipelined:
    """Runs a Lua script for all requests of one event-loop turn in one pipeline: one write
    and one read for the lot instead of one each. Each script still runs atomically on its
    own; the pipeline is not a transaction. Its span joins the trace of the request that
    opened it."""

    # A batch resolves all at once, so its requests go on in lockstep and the first of them
    # waits for the last; smaller batches let the first ones reach the LLM sooner.
    MAX_BATCH = 32

    def __init__(self, redis: Redis, script: str) -> None:
        self._redis = redis
        self._script = script
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()  # its name
        self._waiting: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[str], args: list[str]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((keys, args, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)  # once every request ready this turn has asked
        return await future

    def _flush(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.MAX_BATCH]
            del self._waiting[: self.MAX_BATCH]
            sending = asyncio.create_task(self._send(batch))
            self._sending.add(sending)  # the loop keeps only a weak reference
            sending.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._run([(keys, args) for keys, args, _ in batch])
        except BaseException as exc:  # Redis unreachable: every request of the batch hears it
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()  # shutting down
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # its request was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _run(
        self, calls: list[tuple[list[str], list[str]]], *, load: bool = True
    ) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown and load:  # a new or flushed Redis: load the script, run again what did not
            await self._redis.script_load(self._script)
            again = await self._run([calls[i] for i in unknown], load=False)
            for i, result in zip(unknown, again, strict=True):
                results[i] = result
        return results
