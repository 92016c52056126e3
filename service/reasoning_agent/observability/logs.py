"""JSON log lines on stdout, each tagged with its request id, with every configured secret redacted."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "RedactingJsonFormatter",
    "configure_logging",
    "logging_config",
    "redact",
    "request_id",
]

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_REDACTED = "[REDACTED]"
# A header or field that holds a credential, however it was logged: `'x-api-key': 'v'`,
# `"authorization": "Bearer v"`, `api_key=v` (quotes escaped or not, as JSON lines show them).
_SECRET_FIELD = re.compile(
    r"""((?:x-api-key|authorization|api[_-]?key|openai_api_key|password)\\?["']?\s*[:=]\s*\\?["']?)"""
    r"""((?:bearer\s+)?[^"'\\\s,}]+)""",
    re.IGNORECASE,
)
# One is in every _SECRET_FIELD match, and none in a logger's name such as `reasoning_agent.api`.
_SECRET_FIELD_WORDS = ("api-key", "api_key", "apikey", "authorization", "password")
_secrets: tuple[str, ...] = ()


class _RequestIdFilter(logging.Filter):
    """Tags each line with its request id and, when tracing, the trace and span ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
        rid = request_id.get()
        if rid is not None:
            record.request_id = rid
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class RedactingJsonFormatter(JsonFormatter):
    """A JSON formatter that removes every configured secret from the finished line."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for secret in _secrets:
            if secret in line:
                line = line.replace(secret, _REDACTED)
        lowered = line.lower()
        if not any(word in lowered for word in _SECRET_FIELD_WORDS):
            return line  # the common case, without the regular expression's cost
        return _SECRET_FIELD.sub(rf"\g<1>{_REDACTED}", line)


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig that sends everything, gunicorn's and uvicorn's logs included, out as JSON."""
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
        "formatter": "json",
        "filters": ["request_id"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": _RequestIdFilter}},
        "formatters": {
            "json": {
                "()": RedactingJsonFormatter,
                "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
                "rename_fields": {
                    "asctime": "time",
                    "levelname": "level",
                    "name": "logger",
                    "process": "pid",
                },
                "datefmt": "%Y-%m-%dT%H:%M:%S%z",
            }
        },
        "handlers": {"stdout": handler},
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stdout"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            "uvicorn.error": {"level": level, "handlers": ["stdout"], "propagate": False},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            "httpx": {"level": "WARNING"},
            "httpx2": {"level": "WARNING"},
            "openai": {"level": "WARNING"},
        },
    }


def redact(secrets: Iterable[str]) -> None:
    """Add strings that must never reach a log line, whoever logs them, in every form a JSON
    line can show them (quotes, backslashes and non-ASCII escaped or not)."""
    global _secrets
    forms = set(_secrets)
    for secret in secrets:
        if secret:
            forms.update(
                (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1])
            )
    _secrets = tuple(sorted(forms, key=len, reverse=True))


def configure_logging(level: str, *, secrets: Iterable[str] = ()) -> None:
    """Install JSON logging for this process."""
    redact(secrets)
    # No line shows the caller, the thread or the multiprocessing name: records skip finding
    # them (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.config.dictConfig(logging_config(level))
