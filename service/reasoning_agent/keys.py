"""API keys: parsed from API_KEYS / API_KEYS_FILE, checked in constant time, known by name."""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.observability import logs
from reasoning_agent.watched import WatchedFile

__all__ = ["ApiKey", "KeyRing", "fingerprint"]

log = logging.getLogger(__name__)

_FINGERPRINT_KEY = b"reasoning-agent/api-key/v1"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MIN_KEY_CHARS = 16
_MAX_KEY_CHARS = 512


def fingerprint(secret: str) -> str:
    """A keyed hash of a key: what we store and log instead of the key itself."""
    return hmac.new(_FINGERPRINT_KEY, secret.encode("utf-8", "surrogatepass"), "sha256").hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller: the key's readable name (its tasks and limits belong to it) and fingerprint."""

    name: str
    fingerprint: str


def parse_keys(text: str, *, source: str) -> dict[str, ApiKey]:
    """Parse `key` or `name:key` entries separated by commas or newlines; map fingerprint to key."""
    keys: dict[str, ApiKey] = {}
    names: set[str] = set()
    for position, raw in enumerate(re.split(r"[,\n]", text), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = "", entry
        elif not _NAME.fullmatch(name):
            raise ConfigError(f"{source}: entry {position} has a name that is not [A-Za-z0-9_.-]")
        if not _MIN_KEY_CHARS <= len(secret) <= _MAX_KEY_CHARS:
            raise ConfigError(
                f"{source}: entry {position} must be {_MIN_KEY_CHARS} to {_MAX_KEY_CHARS} characters"
            )
        logs.redact([secret])
        digest = fingerprint(secret)
        name = name or f"key-{digest[:12]}"
        if digest in keys:
            continue
        if name in names:
            raise ConfigError(f"{source}: the name {name!r} is given to two keys")
        names.add(name)
        keys[digest] = ApiKey(name=name, fingerprint=digest)
    return keys


class KeyRing:
    """The set of valid keys; re-reads API_KEYS_FILE when it changes so rotation needs no restart."""

    def __init__(self, *, inline: str | None, file: Path | None) -> None:
        self._inline = parse_keys(inline, source="API_KEYS") if inline else {}
        self._file: WatchedFile[dict[str, ApiKey]] | None = None
        if file is not None:
            self._file = WatchedFile(file, self._with_file, name="API_KEYS_FILE", logger=log)
        if not self._keys:
            raise ConfigError("API_KEYS / API_KEYS_FILE: no API key is configured")

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        inline = settings.api_keys.get_secret_value() if settings.api_keys else None
        return cls(inline=inline, file=settings.api_keys_file)

    @property
    def _keys(self) -> dict[str, ApiKey]:
        return self._inline if self._file is None else self._file.current

    @property
    def names(self) -> list[str]:
        """The callers' names, as tasks and limits know them."""
        return sorted(key.name for key in self._keys.values())

    def authenticate(self, presented: str | None) -> ApiKey | None:
        """The key's owner, or None; every known key is compared so timing tells nothing."""
        if not presented or len(presented) > _MAX_KEY_CHARS:
            return None
        digest = fingerprint(presented).encode()
        found: ApiKey | None = None
        for known, key in self._keys.items():
            if hmac.compare_digest(known.encode(), digest):
                found = key
        return found

    def _with_file(self, text: str) -> dict[str, ApiKey]:
        """The inline keys and the file's; a re-read that empties the file is refused."""
        from_file = parse_keys(text, source="API_KEYS_FILE")
        if not from_file and self._file is not None:
            raise ConfigError("API_KEYS_FILE: holds no key")
        inline_names = {key.name for key in self._inline.values()}
        for digest, key in from_file.items():
            if key.name in inline_names and digest not in self._inline:
                raise ConfigError(
                    f"API_KEYS_FILE: the name {key.name!r} is in both API_KEYS and "
                    "API_KEYS_FILE with different keys, which would make them one caller"
                )
        return {**self._inline, **from_file}
