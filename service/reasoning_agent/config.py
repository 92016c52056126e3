"""All configuration, read once from the environment into one typed object."""

from __future__ import annotations

import re
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import limits
from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigError", "LimitsText", "Settings", "load_settings", "parse_limits"]


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def parse_limits(value: str) -> list[limits.RateLimitItem]:
    """`60/minute`, `2000000/day;50000000/month`: ValueError for anything else."""
    try:
        parsed = limits.parse_many(value)
    except ValueError:
        parsed = []
    if not parsed:
        raise ValueError("expected limits syntax such as 60/minute or 60/minute;1000/day")
    return parsed


def _limits_text(value: str) -> str:
    parse_limits(value)
    return value


LimitsText = Annotated[str, AfterValidator(_limits_text)]


# Public-key signatures only: a shared secret (HS*) or `none` never verifies a bearer token.
_SIGNATURE_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class Settings(BaseSettings):
    """The service's environment, validated at start so a typo fails loudly."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, env_ignore_empty=True
    )

    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    admin_keys: str = ""  # names from API_KEYS whose callers may read /metrics on the main port
    # Bearer tokens (JWTs) from this OpenID Connect issuer, beside the API keys.
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None  # the issuer's key set, when discovery cannot find it
    oidc_algorithms: str = "RS256,ES256"
    oidc_leeway_s: float = Field(30.0, ge=0, le=600)
    oidc_required_claims: str = ""  # claim=value pairs, comma-separated
    oidc_principal_claim: str = Field("sub", min_length=1)
    oidc_jwks_cooldown_s: float = Field(30.0, ge=0, le=3600)  # between fetches for unknown keys
    oidc_jwks_refresh_s: float = Field(300.0, gt=0)  # a key set this old is fetched again
    oidc_ca_file: Path | None = None  # to trust the issuer's TLS certificate
    oidc_fetch_token_file: Path | None = None  # sent as a bearer token when fetching its keys
    rate_limit: LimitsText = "60/minute"
    query_rate_limit: LimitsText = "600/minute"
    # Tokens per key (unset: none), for keys KEY_POLICIES_FILE gives no limits of their own.
    token_rate_limit: LimitsText | None = None
    token_budget: LimitsText | None = None
    key_policies_file: Path | None = None
    # Sent upstream, and reserved, for a request under token limits that sets no max_tokens.
    default_max_tokens: int = Field(1024, ge=1, le=1_000_000)
    redis_url: SecretStr | None = None
    rate_limit_on_store_error: Literal["local", "allow", "deny"] = "local"
    database_url: SecretStr = SecretStr("sqlite:///./reasoning_agent.db")
    # PostgreSQL connections each worker keeps at most for task writes, and as many for the rest.
    database_pool_size: int = Field(20, ge=1, le=500)
    llm_provider: str = "openai"
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = Field("gpt-4o-mini", min_length=1)
    llm_max_attempts: int = Field(3, ge=1, le=20)
    # Models that take `max_completion_tokens` and no `temperature` (a regular expression).
    reasoning_models: str = r"^(o[1-9]|gpt-5)"
    # A comment line on every event stream that has sent nothing for this long.
    stream_heartbeat_s: float = Field(15.0, gt=0, le=3600)
    # What a streamed task does when its client goes: runs to its end, or is cancelled.
    stream_on_disconnect: Literal["continue", "cancel"] = "continue"
    # How long a task's events stay to be followed once it has ended.
    stream_events_ttl_s: float = Field(600.0, gt=0)
    mock_stream_delay_ms: float = Field(20.0, ge=0, le=10_000)
    llm_timeout_s: float = Field(60.0, gt=0, le=3600)
    llm_max_response_bytes: int = Field(8 * 2**20, ge=1024)
    # Upstream calls in flight per worker, each on a connection of its own (HTTP/1.1).
    llm_max_connections: int = Field(10_000, ge=1, le=1_000_000)
    max_prompt_chars: int = Field(32_000, ge=1, le=10_000_000)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    store_prompts: bool = True
    retention_days: float | None = Field(None, gt=0)
    retention_interval_s: float = Field(3600.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    # For a client's request head to arrive, and the longest pause in its body.
    head_timeout_s: float = Field(10.0, gt=0, le=300)
    keepalive_s: float = Field(5.0, gt=0, le=300)  # an idle keep-alive connection is closed
    max_connections: int = Field(10_000, ge=1, le=1_000_000)  # per worker; past it, 503
    worker_concurrency: int = Field(10, ge=1, le=1000)
    # On SIGTERM, how long in-process background tasks may go on before they are queued again.
    background_drain_s: float = Field(10.0, ge=0, le=3600)
    task_runner: Literal["auto", "arq", "local"] = "auto"
    # Touched by `reasoning-agent worker` while its loop runs and Redis answers.
    worker_heartbeat_file: Path = Path(tempfile.gettempdir()) / "reasoning-agent-worker.alive"
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("reasoning_models")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("admin_keys")
    @classmethod
    def _names(cls, value: str) -> str:
        for name in value.split(","):
            if name.strip() and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name.strip()):
                raise ValueError(f"{name.strip()!r} is not a key name ([A-Za-z0-9_.-])")
        return value

    @field_validator("oidc_issuer", "oidc_jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("oidc_algorithms")
    @classmethod
    def _asymmetric(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        wrong = [name for name in names if name not in _SIGNATURE_ALGORITHMS]
        if not names or wrong:
            raise ValueError(
                f"expected a comma-separated list of {', '.join(sorted(_SIGNATURE_ALGORITHMS))}"
            )
        return value

    @field_validator("oidc_required_claims")
    @classmethod
    def _claim_pairs(cls, value: str) -> str:
        for pair in value.split(","):
            if pair.strip() and not re.fullmatch(r"[^=\s]+=[^,]*", pair.strip()):
                raise ValueError(f"{pair.strip()!r} is not claim=value")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = value.get_secret_value().split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("expected sqlite:///path or postgresql://user@host/db")
        return value

    @model_validator(mode="after")
    def _sane_together(self) -> Settings:
        if self.task_runner == "arq" and self.redis_url is None:
            raise ValueError("TASK_RUNNER=arq needs REDIS_URL: the queue lives in Redis")
        if self.oidc_issuer is not None and not self.oidc_audience:
            raise ValueError(
                "OIDC_AUDIENCE: required with OIDC_ISSUER, or a token minted for any other "
                "service would be accepted here"
            )
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                f"WORKERS={self.workers} without REDIS_URL would give every worker its own "
                "rate-limit counters; set REDIS_URL or use WORKERS=1"
            )
        return self

    @property
    def uses_arq(self) -> bool:
        """Background tasks go through Redis to `reasoning-agent worker` processes."""
        return self.task_runner == "arq" or (
            self.task_runner == "auto" and self.redis_url is not None
        )

    def secret_values(self) -> list[str]:
        """Every configured secret string, so logging can redact them wherever they turn up."""
        from sqlalchemy import make_url

        found = [self.openai_api_key.get_secret_value()] if self.openai_api_key else []
        for url in (self.database_url, self.redis_url):
            if url is not None:
                password = make_url(url.get_secret_value()).password
                if password:
                    found.append(str(password))
        return found

    @cached_property
    def admin_names(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.admin_keys.split(",") if name.strip())

    @cached_property
    def oidc_algorithm_names(self) -> list[str]:
        return [name.strip() for name in self.oidc_algorithms.split(",") if name.strip()]

    @cached_property
    def oidc_claims(self) -> dict[str, str]:
        pairs = (pair.strip().split("=", 1) for pair in self.oidc_required_claims.split(","))
        return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}

    @cached_property
    def rate_limits(self) -> list[limits.RateLimitItem]:
        return parse_limits(self.rate_limit)

    @cached_property
    def query_rate_limits(self) -> list[limits.RateLimitItem]:
        return parse_limits(self.query_rate_limit)

    @cached_property
    def token_rate_limits(self) -> list[limits.RateLimitItem]:
        return parse_limits(self.token_rate_limit) if self.token_rate_limit else []

    @cached_property
    def token_budgets(self) -> list[limits.RateLimitItem]:
        return parse_limits(self.token_budget) if self.token_budget else []


def load_settings() -> Settings:
    """Read the environment; raise ConfigError with one line naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["loc"]:
                problems.append(f"{str(error['loc'][0]).upper()}: {message}")
            else:
                problems.append(message)
        raise ConfigError("; ".join(problems)) from None
