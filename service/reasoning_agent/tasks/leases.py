"""Leases: an unfinished task names the process working on it, which renews the claim while it
lives, so the sweep can tell a dead process's tasks from a slow one's."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reasoning_agent.tasks.repository import TaskRepository

__all__ = ["LEASE_S", "MAX_TRIES", "QUEUE_CHECK_S", "Leases", "dead_here", "holder_name"]

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a held task is renewed every third of this; unrenewed this long, it is free
QUEUE_CHECK_S = 60.0  # how often a queued task's job is looked for in its runner
MAX_TRIES = 3  # runs of one background task, when the processes running it die


def holder_name() -> str:
    """This process, as a lease names it: host, pid, and a nonce that tells a restarted
    process (same host and pid, in a container) from the one before."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def dead_here(holder: str, *, me: str) -> bool:
    """True for a holder on this host whose process is gone, or that was this process's pid
    in an earlier life; a live or foreign holder is left to its lease."""
    host, _, rest = holder.partition(":")
    pid, _, _nonce = rest.partition(":")
    if host != socket.gethostname() or holder == me or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return _zombie(int(pid))


def _zombie(pid: int) -> bool:
    """Dead but not yet reaped (a killed worker whose parent died with it), where /proc says."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class Leases:
    """The tasks this process holds, renewed together by one statement every LEASE_S / 3."""

    def __init__(
        self, repository: TaskRepository, *, on_lost: Callable[[list[str]], object] | None = None
    ) -> None:
        self._repository = repository
        self._held: set[str] = set()
        self._on_lost = on_lost  # told of held tasks whose row no longer names this process

    @contextmanager
    def holding(self, task_id: str) -> Iterator[None]:
        self._held.add(task_id)
        try:
            yield
        finally:
            self._held.discard(task_id)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._repository.lease_s / 3)
            if not self._held:
                continue
            asked = list(self._held)
            try:
                renewed = await self._repository.renew(asked)
            except Exception as exc:  # the next round tries again; the lease has slack
                log.warning("could not renew task leases: %s", exc.__class__.__name__)
                continue
            # Still held here but not renewed: cancelled (or taken over) by another process.
            lost = [
                task_id for task_id in asked if task_id not in renewed and task_id in self._held
            ]
            if lost and self._on_lost is not None:
                self._on_lost(lost)
