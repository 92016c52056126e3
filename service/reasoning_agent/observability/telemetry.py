"""OpenTelemetry tracing, set up per worker from the standard OTEL_* variables, off by default.

With no OTLP endpoint set (or OTEL_SDK_DISABLED=true) nothing is installed and the API's no-op
tracer stays in place, so the spans this package opens cost next to nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode

from reasoning_agent.config import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from sqlalchemy import Engine

__all__ = [
    "capture_content",
    "current_trace_id",
    "inject_headers",
    "instrument_engines",
    "setup_tracing",
    "span",
    "tracer",
    "tracing_configured",
]

tracer = trace.get_tracer("reasoning_agent")

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_provider: TracerProvider | None = None


def tracing_configured(env: Mapping[str, str] = os.environ) -> bool:
    """Tracing is on when an OTLP endpoint is set and the SDK is not disabled."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name) for name in _ENDPOINT_VARIABLES)


def check_tracing_config(env: Mapping[str, str] = os.environ) -> None:
    """Refuse an exporter protocol this build does not ship, before any worker starts."""
    if not tracing_configured(env):
        return
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name)
        if protocol:
            if protocol != "http/protobuf":
                raise ConfigError(
                    f"{name}: only http/protobuf is supported (port 4318), not {protocol!r}"
                )
            return


def capture_content() -> bool:
    """Prompt and answer text go into spans only when OTEL_CAPTURE_CONTENT=true."""
    return os.environ.get("OTEL_CAPTURE_CONTENT", "").strip().lower() == "true"


def setup_tracing(app: FastAPI, *, exporter: SpanExporter | None = None) -> bool:
    """Install the SDK and the FastAPI and Redis instrumentation in this process; False when off."""
    global _provider
    if exporter is None and not tracing_configured():
        return False
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if _provider is None:
        _provider = TracerProvider(
            resource=Resource.create()
        )  # OTEL_SERVICE_NAME, _RESOURCE_ATTRIBUTES
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            _provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(_provider)
        RedisInstrumentor().instrument(tracer_provider=_provider)
    FastAPIInstrumentor.instrument_app(
        app,
        server_request_hook=_drop_query,
        tracer_provider=_provider,
        excluded_urls="/livez,/readyz",
        exclude_spans=["receive", "send"],
    )
    return True


def _drop_query(current: Span, scope: dict[str, Any]) -> None:
    """Keep query strings (`/query?q=...` searches prompt text) out of the server span."""
    if not current.is_recording() or not scope.get("query_string"):
        return
    path = scope.get("path", "")
    current.set_attribute("http.target", path)
    current.set_attribute("url.query", "[REDACTED]")
    for key in ("http.url", "url.full"):
        value = current.attributes.get(key) if hasattr(current, "attributes") else None
        if isinstance(value, str):
            current.set_attribute(key, value.split("?", 1)[0])


def instrument_engines(engines: list[Engine]) -> None:
    """One span per SQL statement, when tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # The instrumentation declares sqlalchemy < 2.1 but works on 2.1's unchanged event API.
    SQLAlchemyInstrumentor().instrument(
        engines=engines, tracer_provider=_provider, skip_dep_check=True
    )


def shutdown_tracing() -> None:
    """Flush spans still buffered; called as a worker stops."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)


_NO_SPAN = nullcontext(trace.INVALID_SPAN)


def span(
    name: str, *, kind: trace.SpanKind = trace.SpanKind.INTERNAL
) -> AbstractContextManager[Span]:
    """A span that records an escaping exception and marks itself ERROR; with tracing off, a
    shared no-op, cheaper than the API's own no-op span."""
    if _provider is None:
        return _NO_SPAN
    return _recording_span(name, kind)


@contextmanager
def _recording_span(name: str, kind: trace.SpanKind) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name, kind=kind, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            if current.is_recording():
                current.record_exception(exc)
                current.set_attribute("error.type", exc.__class__.__name__)
                current.set_status(Status(StatusCode.ERROR, exc.__class__.__name__))
            raise


def inject_headers() -> dict[str, str]:
    """The W3C trace headers of the current span, for an outgoing call."""
    if _provider is None:
        return {}
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def current_trace_id(incoming: Mapping[str, str] | None = None) -> str | None:
    """The trace id (32 hex digits) of this request: its span's, else the caller's traceparent."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid and incoming is not None:
        extracted = trace.get_current_span(propagate.extract(incoming)).get_span_context()
        context = extracted
    return format(context.trace_id, "032x") if context.is_valid else None
