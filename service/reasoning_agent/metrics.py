"""Prometheus metrics; under gunicorn every worker writes to PROMETHEUS_MULTIPROC_DIR and a scrape sums them."""

from __future__ import annotations

import os

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
    "CONTENT_TYPE_LATEST",
    "HTTP_IN_FLIGHT",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "LLM_ATTEMPTS",
    "RATE_LIMITED",
    "TASKS",
    "render",
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


def render() -> bytes:
    """The text exposition of every worker's metrics (or this process's, outside gunicorn)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
