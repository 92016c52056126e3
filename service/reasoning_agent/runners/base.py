"""What a runner is: the place a queued task goes to be run."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Runner"]


class Runner(Protocol):
    """Takes a stored `queued` task by its id; the task service records what comes of it."""

    async def submit(self, task_id: str) -> None: ...

    async def cancel(self, task_id: str) -> None: ...

    async def alive(self, task_ids: list[str]) -> set[str]:
        """Those of `task_ids` whose job this runner still has, waiting or running."""
        ...

    async def aclose(self) -> None: ...
