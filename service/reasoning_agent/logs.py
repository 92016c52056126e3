"""JSON log lines on stdout, each tagged with its request id, with every configured secret redacted."""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

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
_secrets: tuple[str, ...] = ()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
        rid = request_id.get()
        if rid is not None:
            record.request_id = rid
        return True


class RedactingJsonFormatter(JsonFormatter):
    """A JSON formatter that removes every configured secret from the finished line."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for secret in _secrets:
            if secret in line:
                line = line.replace(secret, _REDACTED)
        return line


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
    """Add strings that must never reach a log line, whoever logs them."""
    global _secrets
    _secrets = tuple(sorted({*_secrets, *(s for s in secrets if s)}, key=len, reverse=True))


def configure_logging(level: str, *, secrets: Iterable[str] = ()) -> None:
    """Install JSON logging for this process."""
    redact(secrets)
    logging.config.dictConfig(logging_config(level))
