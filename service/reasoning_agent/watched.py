"""A mounted file's parsed contents, parsed again when it changes, so an edit needs no restart."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from reasoning_agent.config import ConfigError

__all__ = ["WatchedFile"]

T = TypeVar("T")

_CHECK_EVERY_S = 1.0


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    # Kubernetes swaps a mounted file by renaming: the inode changes even when mtime does not.
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class WatchedFile(Generic[T]):
    """Parsed at start (a bad file raises ConfigError), then again at most once a second
    when the file changed; a version that cannot be read or parsed keeps the last good one."""

    def __init__(
        self, path: Path, parse: Callable[[str], T], *, name: str, logger: logging.Logger
    ) -> None:
        self._path, self._parse, self._name, self._log = path, parse, name, logger
        self._lock = threading.Lock()
        self._next_check = time.monotonic() + _CHECK_EVERY_S
        self._stamp, self._value = self._read()

    @property
    def current(self) -> T:
        if time.monotonic() >= self._next_check:
            self._reload_if_changed()
        return self._value

    def _read(self) -> tuple[tuple[int, int, int], T]:
        try:
            stat = self._path.stat()
            text = self._path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{self._name}: cannot read {self._path}: {exc.__class__.__name__}"
            ) from None
        return _stamp(stat), self._parse(text)

    def _reload_if_changed(self) -> None:
        with self._lock:
            if time.monotonic() < self._next_check:
                return  # another thread just looked
            self._next_check = time.monotonic() + _CHECK_EVERY_S
            try:
                stat = os.stat(self._path)
            except OSError as exc:
                self._log.warning(
                    "%s unreadable, keeping the last good one: %s", self._name, exc.strerror
                )
                return
            if _stamp(stat) == self._stamp:
                return
            try:
                self._stamp, self._value = self._read()
            except ConfigError as exc:
                self._log.warning("%s rejected, keeping the last good one: %s", self._name, exc)
                return
            self._log.info("%s reloaded", self._name)
