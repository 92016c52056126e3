"""What each key may do: its request and token limits and its models, from the defaults in
the environment and, per key name, KEY_POLICIES_FILE (re-read when it changes)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import yaml
from limits import RateLimitItem
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reasoning_agent.config import ConfigError, LimitsText, Settings, parse_limits
from reasoning_agent.watched import WatchedFile
from reasoning_agent.windows import TokenWindow, token_windows

__all__ = ["Policies", "Policy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """One key's limits; `models` None lets it use any model."""

    rate_limits: list[RateLimitItem]
    query_rate_limits: list[RateLimitItem]
    token_windows: tuple[TokenWindow, ...]
    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class _PolicyIn(BaseModel):
    """One key's entry in the file; what it leaves out falls back to the defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rate_limit: LimitsText | None = None
    query_rate_limit: LimitsText | None = None
    token_rate_limit: LimitsText | None = None
    token_budget: LimitsText | None = None
    models: list[str] | None = Field(None, min_length=1)


class _FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: dict[str, _PolicyIn] = Field(default_factory=dict)


class Policies:
    """Every key's policy: its own from KEY_POLICIES_FILE, else the defaults."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.default = Policy(
            rate_limits=settings.rate_limits,
            query_rate_limits=settings.query_rate_limits,
            token_windows=token_windows(settings.token_rate_limits, settings.token_budgets),
        )
        self._file: WatchedFile[dict[str, Policy]] | None = None
        if settings.key_policies_file is not None:
            self._file = WatchedFile(
                settings.key_policies_file, self._parse, name="KEY_POLICIES_FILE", logger=log
            )

    def of(self, name: str) -> Policy:
        """The policy of the key (or other caller) called `name`."""
        if self._file is None:
            return self.default
        return self._file.current.get(name, self.default)

    @property
    def names(self) -> list[str]:
        """The names the file gives a policy."""
        return sorted(self._file.current) if self._file is not None else []

    def _parse(self, text: str) -> dict[str, Policy]:
        try:
            loaded: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"KEY_POLICIES_FILE: not YAML or JSON: {exc}") from None
        try:
            entries = _FileIn.model_validate(loaded if loaded is not None else {}).keys
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"KEY_POLICIES_FILE: {where}: {message}") from None
        return {name: self._policy(entry) for name, entry in entries.items()}

    def _policy(self, entry: _PolicyIn) -> Policy:
        settings = self._settings
        rates = settings.token_rate_limits
        budgets = settings.token_budgets
        if entry.token_rate_limit is not None:
            rates = parse_limits(entry.token_rate_limit)
        if entry.token_budget is not None:
            budgets = parse_limits(entry.token_budget)
        return Policy(
            rate_limits=parse_limits(entry.rate_limit)
            if entry.rate_limit is not None
            else settings.rate_limits,
            query_rate_limits=parse_limits(entry.query_rate_limit)
            if entry.query_rate_limit is not None
            else settings.query_rate_limits,
            token_windows=token_windows(rates, budgets),
            models=frozenset(entry.models) if entry.models is not None else None,
        )
