"""Per-key limits, decided in one atomic Redis script or in-process: requests in a sliding
window log, tokens reserved in fixed windows.

Requests: a key may make at most `amount` in any window of `seconds` (for `60/minute`: never a
61st within 60 s of the first). Tokens: before a call its estimate is reserved in every token
window of the key, and only if each has room for it (used + reserved + estimate <= limit);
when the call ends, `settle` turns the reservation into what the upstream reported. Requests
and tokens are checked in the same script, so concurrent calls cannot all see the same room.
A reservation is a record under its task's id: it settles once, however often it is settled.

With Redis every worker of every replica shares one state per key; Redis's clock decides the
request windows, and a token window is never rolled back by a replica whose clock is behind.
The keys of one caller share a hash tag, so the scripts also run on Redis Cluster.
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
from reasoning_agent.windows import TokenWindow, WindowKind

__all__ = [
    "Admission",
    "Decision",
    "LocalLimiter",
    "RateLimiter",
    "StoreUnavailable",
    "TokenAsk",
    "TokenDecision",
    "WindowState",
]

log = logging.getLogger(__name__)

OnStoreError = Literal["local", "allow", "deny"]

# KEYS: n request logs (sorted sets), m token windows (hashes), then the reservation record.
# ARGV: n, m, the request's id, the tokens to reserve, the record's lifetime (ms); per request
# limit its amount and window (ms); per token window its limit, index and lifetime (ms).
# Returns {requests allowed, remaining, reset_at_ms, retry_after_ms, index of the tightest,
# tokens fit, then used and reserved of each token window}. Nothing is recorded unless both fit.
_ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local member, tokens = ARGV[3], tonumber(ARGV[4])
local allowed, retry = 1, 0
local counts = {}
for i = 1, n do
  local amount, window = tonumber(ARGV[4 + 2 * i]), tonumber(ARGV[5 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] >= amount then
    allowed = 0
    local frees = redis.call('ZRANGE', KEYS[i], counts[i] - amount, counts[i] - amount, 'WITHSCORES')
    retry = math.max(retry, tonumber(frees[2]) + window - now)
  end
end
local fits, states = 1, {}
for j = 1, m do
  local at = 5 + 2 * n + 3 * (j - 1)
  local limit, index = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local state = redis.call('HMGET', KEYS[n + j], 'start', 'used', 'reserved')
  local start, used, reserved = tonumber(state[1]), tonumber(state[2]) or 0, tonumber(state[3]) or 0
  if start == nil or index > start then  -- a new window: what the last one held is over
    start, used, reserved = index, 0, 0
    redis.call('HSET', KEYS[n + j], 'start', start, 'used', 0, 'reserved', 0)
    redis.call('PEXPIRE', KEYS[n + j], ARGV[at + 3])  -- kept until the window ends, and a while
  end
  if used + reserved + tokens > limit then fits = 0 end
  states[j] = {start, used, reserved}
end
local ok = allowed == 1 and fits == 1
local remaining, reset, tightest = -1, now, 1
for i = 1, n do
  local amount, window = tonumber(ARGV[4 + 2 * i]), tonumber(ARGV[5 + 2 * i])
  if ok then
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
local out = {allowed, remaining, reset, retry, tightest, fits}
for j = 1, m do
  if ok then
    states[j][3] = redis.call('HINCRBY', KEYS[n + j], 'reserved', tokens)
    redis.call('HSET', KEYS[n + m + 1], KEYS[n + j], states[j][1])
  end
  out[#out + 1] = states[j][2]
  out[#out + 1] = states[j][3]
end
if ok and m > 0 then
  redis.call('HSET', KEYS[n + m + 1], '', tokens)
  redis.call('PEXPIRE', KEYS[n + m + 1], ARGV[5])
end
return out
"""

# KEYS[1]: a reservation record (its windows, and under '' its tokens). ARGV[1]: the tokens to
# charge instead. Each window still the one reserved in gives the reservation back and is
# charged; the record goes. Returns the tokens that were reserved, or -1 for no record.
_SETTLE = """
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return -1 end
redis.call('DEL', KEYS[1])
local charge, tokens = tonumber(ARGV[1]), 0
for i = 1, #record, 2 do
  if record[i] == '' then tokens = tonumber(record[i + 1]) end
end
for i = 1, #record, 2 do
  local window = record[i]
  if window ~= '' and redis.call('HGET', window, 'start') == record[i + 1] then
    redis.call('HINCRBY', window, 'reserved', -tokens)
    redis.call('HINCRBY', window, 'used', charge)
  end
end
return tokens
"""

# How long a token window's state outlives its end, for settlements that come late.
_WINDOW_GRACE_S = 60.0


class StoreUnavailable(Exception):
    """The shared store failed, and what was asked cannot be decided without it."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request check, with what the X-RateLimit-* headers report."""

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


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenAsk:
    """A reservation to make: `tokens` in each of `windows`, recorded under `id` (its task's)."""

    id: str
    tokens: int
    windows: tuple[TokenWindow, ...]


@dataclass(frozen=True, slots=True)
class WindowState:
    """A token window as one check found it (after its reservation, when there was one)."""

    window: TokenWindow
    limit: int
    used: int
    reserved: int
    reset_at: float  # its end, Unix seconds

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class TokenDecision:
    """Whether a reservation fitted every token window, and what X-TokenLimit-* report."""

    allowed: bool
    tokens: int
    windows: tuple[WindowState, ...]
    now: float

    @property
    def tightest(self) -> WindowState:
        return min(self.windows, key=lambda state: state.remaining)

    @property
    def refused_by(self) -> list[WindowState]:
        if self.allowed:
            return []
        return [s for s in self.windows if s.used + s.reserved + self.tokens > s.limit]

    @property
    def kind(self) -> WindowKind:
        """What refused it: a budget if any budget did, else a rate."""
        kinds = {state.window.kind for state in self.refused_by}
        return "token_budget" if "token_budget" in kinds else "token_rate"

    @property
    def retry_after(self) -> int | None:
        """Seconds until every refusing window starts anew (0 when none refused); None when
        it never fits."""
        refused = self.refused_by
        if not refused:
            return 0
        if any(self.tokens > state.limit for state in refused):
            return None
        return max(1, math.ceil(max(state.reset_at for state in refused) - self.now))

    @property
    def headers(self) -> dict[str, str]:
        tightest = self.tightest
        return {
            "X-TokenLimit-Limit": str(tightest.limit),
            "X-TokenLimit-Remaining": str(tightest.remaining),
            "X-TokenLimit-Reset": str(math.ceil(tightest.reset_at)),
        }


@dataclass(frozen=True, slots=True)
class Admission:
    """One request's check: its request limits and, when the key has any, its token limits."""

    requests: Decision
    tokens: TokenDecision | None = None

    @property
    def allowed(self) -> bool:
        return self.requests.allowed and (self.tokens is None or self.tokens.allowed)

    @property
    def reserved(self) -> int | None:
        """The tokens it reserved, if it reserved any."""
        return self.tokens.tokens if self.allowed and self.tokens is not None else None

    @property
    def headers(self) -> dict[str, str]:
        tokens = self.tokens.headers if self.tokens is not None else {}
        return {**self.requests.headers, **tokens}


def _window_ms(item: RateLimitItem) -> int:
    return int(item.get_expiry() * 1000)


class LocalLimiter:
    """The same limits in this process's memory; `share` divides every amount."""

    _PURGE_ABOVE = 10_000  # reservations kept before expired ones are looked for

    def __init__(self, *, share: int = 1) -> None:
        self._share = max(1, share)
        self._logs: dict[str, deque[float]] = {}
        self._windows: dict[str, list[int]] = {}  # start, used, reserved
        self._reservations: dict[str, tuple[float, int, dict[str, int]]] = {}

    def hit(self, scope: str, owner: str, items: list[RateLimitItem]) -> Decision:
        return self.admit(scope, owner, items).requests

    def admit(
        self, scope: str, owner: str, items: list[RateLimitItem], tokens: TokenAsk | None = None
    ) -> Admission:
        now_s = time.time()
        now = now_s * 1000
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
        states = self._token_states(owner, tokens, now_s) if tokens is not None else []
        fits = tokens is None or all(
            used + reserved + tokens.tokens <= limit for _, limit, used, reserved in states
        )
        ok = allowed and fits
        tightest: Decision | None = None
        for amount, window, entries in logs:
            if ok:
                entries.append(now)
            left = max(0, amount - len(entries))
            if tightest is None or left < tightest.remaining:
                reset = (entries[0] + window) if entries else now
                tightest = _decision(allowed, amount, left, reset, retry)
        assert tightest is not None
        if tokens is None:
            return Admission(tightest)
        if ok:
            self._reserve(owner, tokens, states, now_s)
        shown = tuple(
            WindowState(
                window,
                limit,
                used,
                reserved + (tokens.tokens if ok else 0),
                window.span(now_s)[2],
            )
            for window, limit, used, reserved in states
        )
        return Admission(tightest, TokenDecision(fits, tokens.tokens, shown, now_s))

    def _token_states(
        self, owner: str, ask: TokenAsk, now: float
    ) -> list[tuple[TokenWindow, int, int, int]]:
        """Each window of the ask with its limit, used and reserved; a window that has
        ended starts anew."""
        states = []
        for window in ask.windows:
            index = window.span(now)[0]
            state = self._windows.setdefault(f"{owner}:{window.name}", [index, 0, 0])
            if index > state[0]:
                state[:] = [index, 0, 0]
            states.append((window, max(1, window.limit // self._share), state[1], state[2]))
        return states

    def _reserve(
        self, owner: str, ask: TokenAsk, states: list[tuple[TokenWindow, int, int, int]], now: float
    ) -> None:
        if len(self._reservations) > self._PURGE_ABOVE:
            for expired in [k for k, (until, _, _) in self._reservations.items() if until < now]:
                del self._reservations[expired]
        windows = {}
        for window, _, _, _ in states:
            state = self._windows[f"{owner}:{window.name}"]
            state[2] += ask.tokens
            windows[f"{owner}:{window.name}"] = state[0]
        until = max(window.span(now)[2] for window in ask.windows) + _WINDOW_GRACE_S
        self._reservations[f"{owner}:{ask.id}"] = (until, ask.tokens, windows)

    def settle(self, owner: str, reservation: str, *, charge: int) -> int | None:
        """Give a reservation back and charge `charge` instead; the tokens it held, or None
        when this process holds no such reservation."""
        record = self._reservations.pop(f"{owner}:{reservation}", None)
        if record is None:
            return None
        _, tokens, windows = record
        for key, start in windows.items():
            state = self._windows.get(key)
            if state is not None and state[0] == start:
                state[2] -= tokens
                state[1] += charge
        return tokens

    def usage(self, owner: str, windows: tuple[TokenWindow, ...]) -> list[WindowState]:
        now, found = time.time(), []
        for window in windows:
            index, _, end = window.span(now)
            start, used, reserved = self._windows.get(f"{owner}:{window.name}", [index, 0, 0])
            if start != index:
                used = reserved = 0
            found.append(
                WindowState(window, max(1, window.limit // self._share), used, reserved, end)
            )
        return found


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
            self._admit = _Pipelined(self._redis, _ADMIT)
            self._settle = _Pipelined(self._redis, _SETTLE)
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
        return (await self.admit(scope, owner, items)).requests

    async def admit(
        self, scope: str, owner: str, items: list[RateLimitItem], tokens: TokenAsk | None = None
    ) -> Admission:
        """Count one request of `owner` and reserve its `tokens`, both or neither: denied if
        any request limit is full or any token window lacks room."""
        if tokens is not None and not tokens.windows:
            tokens = None  # nothing to reserve in
        if self._redis is None:
            return self._local.admit(scope, owner, items, tokens)
        if time.monotonic() >= self._store_down_until:
            try:
                admission = await self._shared_admit(scope, owner, items, tokens)
            except Exception as exc:
                self._store_failed(exc)
            else:
                if self._incident:
                    self._incident = False
                    log.info("rate-limit store reachable again")
                return admission
        metrics.RATE_LIMIT_STORE_ERRORS.labels(self._on_store_error).inc()
        if self._on_store_error == "deny":
            raise StoreUnavailable("the rate-limit store is unreachable")
        if self._on_store_error == "allow":
            amount = items[0].amount
            return Admission(Decision(True, amount, amount, math.ceil(time.time()), 0))
        return self._fallback.admit(scope, owner, items, tokens)

    def _store_failed(self, exc: Exception) -> None:
        self._store_down_until = time.monotonic() + self._RETRY_STORE_AFTER_S
        if not self._incident:
            self._incident = True
            log.error(
                "rate-limit store unreachable, limits now %s: %s",
                self._on_store_error,
                exc.__class__.__name__,
            )

    def _tag(self, scope: str, owner: str) -> str:
        return f"{self._prefix}:{{{scope}:{owner}}}"  # one hash slot per caller and scope

    async def _shared_admit(
        self, scope: str, owner: str, items: list[RateLimitItem], tokens: TokenAsk | None
    ) -> Admission:
        tag = self._tag(scope, owner)
        keys = [f"{tag}:{item.amount}/{item.get_expiry()}" for item in items]
        windows = tokens.windows if tokens is not None else ()
        keys += [f"{tag}:{window.name}" for window in windows]
        now = time.time()
        spans = [window.span(now) for window in windows]
        lifetime_ms = 0
        if tokens is not None:
            keys.append(f"{tag}:reservation:{tokens.id}")
            lifetime_ms = _lifetime_ms(max(end for _, _, end in spans), now)
        args = [str(len(items)), str(len(windows)), f"{self._process}-{next(self._ids)}"]
        args += [str(tokens.tokens if tokens is not None else 0), str(lifetime_ms)]
        for item in items:
            args += [str(item.amount), str(_window_ms(item))]
        for window, (index, _, end) in zip(windows, spans, strict=True):
            args += [str(window.limit), str(index), str(_lifetime_ms(end, now))]
        allowed, remaining, reset_ms, retry_ms, tightest, fits, *states = await self._admit(
            keys, args
        )
        limit = items[int(tightest) - 1].amount
        requests = _decision(bool(allowed), limit, int(remaining), float(reset_ms), float(retry_ms))
        if tokens is None:
            return Admission(requests)
        shown = tuple(
            WindowState(window, window.limit, int(states[2 * j]), int(states[2 * j + 1]), end)
            for j, (window, (_, _, end)) in enumerate(zip(windows, spans, strict=True))
        )
        return Admission(requests, TokenDecision(bool(fits), tokens.tokens, shown, now))

    async def settle(self, owner: str, reservation: str, *, charge: int) -> int | None:
        """Turn a reservation into a charge of `charge` tokens, once: the tokens it held, or
        None when there is none (settled already, never made, or gone with its window). A
        store that cannot be reached leaves it to expire with its window."""
        for local in (self._local, self._fallback):
            held = local.settle(owner, reservation, charge=charge)
            if held is not None:
                return held
        if self._redis is None:
            return None
        key = f"{self._tag('task', owner)}:reservation:{reservation}"
        try:
            held = int(await self._settle([key], [str(charge)]))
        except Exception as exc:
            log.warning(
                "could not settle the reservation of task %s, it expires with its window: %s",
                reservation,
                exc.__class__.__name__,
            )
            return None
        return None if held < 0 else held

    async def usage(self, owner: str, windows: tuple[TokenWindow, ...]) -> list[WindowState]:
        """What each of `owner`'s token windows has used and reserved now; StoreUnavailable
        when Redis cannot say."""
        if self._redis is None or not windows:
            return self._local.usage(owner, windows)
        now, tag = time.time(), self._tag("task", owner)
        pipe = self._redis.pipeline(transaction=False)
        for window in windows:
            pipe.hmget(f"{tag}:{window.name}", ["start", "used", "reserved"])
        try:
            states = await pipe.execute()
        except Exception as exc:
            raise StoreUnavailable("the rate-limit store is unreachable") from exc
        found = []
        for window, (start, used, reserved) in zip(windows, states, strict=True):
            index, _, end = window.span(now)
            current = start is not None and int(start) == index
            found.append(
                WindowState(
                    window,
                    window.limit,
                    int(used) if current else 0,
                    int(reserved) if current else 0,
                    end,
                )
            )
        return found

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


def _lifetime_ms(end: float, now: float) -> int:
    """How long a token window's state (or a reservation in it) is kept: past its end, a
    while longer for late settlements."""
    return max(1, math.ceil((end - now + _WINDOW_GRACE_S) * 1000))


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
