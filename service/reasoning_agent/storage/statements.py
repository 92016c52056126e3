"""SQLAlchemy write statements compiled once for a driver's own execute, and their spans."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind
from sqlalchemy import Insert
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase

from reasoning_agent.observability import telemetry

__all__ = ["Compiled", "Statements"]


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement as the driver takes it: SQL with positional placeholders, and how to fill
    them from named values."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        return [
            params[name] if process is None else process(params[name])
            for name, process in zip(self.names, self.processors, strict=True)
        ]

    @contextmanager
    def span(self, system: str) -> Iterator[None]:
        """A client span for one run of the statement, as SQLAlchemy's instrumentation makes."""
        with telemetry.span(self.sql.split(None, 1)[0], kind=SpanKind.CLIENT) as current:
            if current.is_recording():
                current.set_attributes({"db.system": system, "db.statement": self.sql})
            yield


class Statements:
    """Compiles each (statement, parameter names) once for `dialect`: SQLAlchemy's execution
    path costs more CPU per write than the SQL itself."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[tuple[UpdateBase, tuple[str, ...]], Compiled] = {}

    def compiled(self, statement: UpdateBase, names: tuple[str, ...]) -> Compiled:
        key = (statement, names)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(statement, names)
        return compiled

    def _compile(self, statement: UpdateBase, names: tuple[str, ...]) -> Compiled:
        dialect = self._dialect
        # An INSERT without values takes its columns from the parameters.
        keys = list(names) if isinstance(statement, Insert) else None
        sql = statement.compile(dialect=dialect, column_keys=keys)
        assert isinstance(sql, SQLCompiler)
        order: Sequence[str] = sql.positiontup or ()
        missing = set(order) - set(names)
        if missing:
            raise ValueError(f"no value for {', '.join(sorted(missing))}")
        processors = tuple(
            sql.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in order
        )
        return Compiled(sql.string, tuple(order), processors)
