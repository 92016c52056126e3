"""Prometheus metrics; under gunicorn every worker writes to PROMETHEUS_MULTIPROC_DIR and a scrape sums them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextvars import ContextVar, Token

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "AUTH_FAILURES",
    "CONTENT_TYPE_LATEST",
    "DATABASE_ERRORS",
    "FIRST_TOKEN_SECONDS",
    "HTTP_IN_FLIGHT",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "LLM_ATTEMPTS",
    "LLM_CALLS",
    "LLM_SECONDS",
    "OVERHEAD_SECONDS",
    "RATE_LIMITED",
    "RATE_LIMIT_STORE_ERRORS",
    "STREAMS_OPEN",
    "STREAM_DISCONNECTS",
    "TASKS",
    "TOKENS",
    "TOKENS_OVERSHOOT",
    "TOKENS_RESERVED",
    "TOKENS_SETTLED",
    "TOKEN_LIMITED",
    "RequestTiming",
    "end_request_timing",
    "initialise",
    "model_label",
    "note_llm_seconds",
    "render",
    "request_timing",
]

_PREFIX = "reasoning_agent"

HTTP_REQUESTS = Counter(
    f"{_PREFIX}_http_requests", "HTTP requests answered.", ["method", "route", "status"]
)
HTTP_REQUEST_SECONDS = Histogram(
    f"{_PREFIX}_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
HTTP_IN_FLIGHT = Gauge(
    f"{_PREFIX}_http_requests_in_flight",
    "HTTP requests being answered now.",
    multiprocess_mode="livesum",
)
TASKS = Counter(f"{_PREFIX}_tasks", "Tasks that reached a final status.", ["status"])
LLM_ATTEMPTS = Counter(
    f"{_PREFIX}_llm_attempts", "Calls made to an LLM provider.", ["provider", "model", "outcome"]
)
RATE_LIMITED = Counter(f"{_PREFIX}_rate_limited", "Requests refused with 429.", ["key", "scope"])
LLM_CALLS = Counter(
    f"{_PREFIX}_llm_calls",
    "Tasks sent to an LLM provider, by how the call (all its attempts) ended.",
    ["provider", "model", "outcome"],
)
FIRST_TOKEN_SECONDS = Histogram(
    f"{_PREFIX}_llm_first_token_seconds",
    "Time from a streamed attempt's start to the first piece of its answer.",
    ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
STREAMS_OPEN = Gauge(
    f"{_PREFIX}_streams_open",
    "Event streams being sent to clients.",
    multiprocess_mode="livesum",
)
STREAM_DISCONNECTS = Counter(
    f"{_PREFIX}_stream_disconnects",
    "Clients gone before their stream ended, by what became of the task.",
    ["task"],
)
LLM_SECONDS = Histogram(
    f"{_PREFIX}_llm_call_duration_seconds",
    "Time from the first attempt to the answer or the last failure.",
    ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
TOKENS = Counter(
    f"{_PREFIX}_llm_tokens",
    "Tokens used, per API key name (`reasoning` is a part of `output`).",
    ["key", "direction"],
)
TOKENS_RESERVED = Counter(
    f"{_PREFIX}_tokens_reserved", "Tokens reserved against token limits before calls.", ["key"]
)
TOKENS_SETTLED = Counter(
    f"{_PREFIX}_tokens_settled",
    "Tokens charged to token limits when calls ended: the upstream's reported usage.",
    ["key"],
)
TOKENS_OVERSHOOT = Counter(
    f"{_PREFIX}_tokens_overshoot", "Tokens calls used past what they had reserved.", ["key"]
)
TOKEN_LIMITED = Counter(
    f"{_PREFIX}_token_limited",
    "Requests refused with 429 by a token limit, by the kind of window that refused.",
    ["key", "kind"],
)
OVERHEAD_SECONDS = Histogram(
    f"{_PREFIX}_overhead_seconds",
    "Time this service added to a request on top of its LLM call.",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0),
)
RATE_LIMIT_STORE_ERRORS = Counter(
    f"{_PREFIX}_rate_limit_store_errors",
    "Limit decisions made without the shared store (Redis) because it failed.",
    ["mode"],
)
DATABASE_ERRORS = Counter(
    f"{_PREFIX}_database_errors", "Requests answered 503 because the database failed."
)
AUTH_FAILURES = Counter(
    f"{_PREFIX}_auth_failures", "Requests refused with 401 (missing or unknown key)."
)


_MODELS_TRACKED = 50
_models_seen: set[str] = set()


def model_label(model: str) -> str:
    """The model as a label, bounded: callers choose models, and labels must not grow forever."""
    if model in _models_seen:
        return model
    if len(_models_seen) < _MODELS_TRACKED and len(model) <= 100:
        _models_seen.add(model)
        return model
    return "other"


def initialise(*, keys: Iterable[str], provider: str, model: str, store_error_mode: str) -> None:
    """Start every series whose labels are known at zero, so dashboards and `rate()` show 0
    rather than no data until the first event."""
    for key in keys:
        for scope in ("task", "query"):
            RATE_LIMITED.labels(key, scope)
        for direction in ("input", "output"):
            TOKENS.labels(key, direction)
    for status in ("completed", "failed"):
        TASKS.labels(status)
    model = model_label(model)
    LLM_SECONDS.labels(provider, model)
    for outcome in ("ok", "upstream_error", "deadline_exceeded", "unavailable"):
        LLM_CALLS.labels(provider, model, outcome)
    LLM_ATTEMPTS.labels(provider, model, "ok")
    RATE_LIMIT_STORE_ERRORS.labels(store_error_mode)
    OVERHEAD_SECONDS.labels("/task")


def render() -> bytes:
    """The text exposition of every worker's metrics (or this process's, outside gunicorn)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


class RequestTiming:
    """What one request spent waiting for the LLM, for the overhead histogram."""

    __slots__ = ("llm_seconds",)

    def __init__(self) -> None:
        self.llm_seconds: float | None = None


_timing: ContextVar[RequestTiming | None] = ContextVar("request_timing", default=None)


def request_timing() -> tuple[RequestTiming, Token[RequestTiming | None]]:
    """Start timing the current request; reset the token when it ends."""
    timing = RequestTiming()
    return timing, _timing.set(timing)


def end_request_timing(token: Token[RequestTiming | None]) -> None:
    _timing.reset(token)


def note_llm_seconds(seconds: float) -> None:
    """The LLM time of the request being served, if this runs inside one."""
    timing = _timing.get()
    if timing is not None:
        timing.llm_seconds = seconds
