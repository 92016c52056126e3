"""Tasks stored straight through the repository, for tests that need one in a given state."""

from __future__ import annotations

from reasoning_agent.tasks.models import Task
from reasoning_agent.tasks.repository import TaskRepository
from reasoning_agent.tasks.status import TaskStatus


async def new_task(
    repository: TaskRepository,
    *,
    prompt: str = "p",
    status: TaskStatus = TaskStatus.PENDING,
    key: str | None = None,
    task_id: str | None = None,
    owner: str = "alice",
) -> tuple[Task, bool]:
    """A task (alice's unless said) for model `fake-model`; True when it is new."""
    return await repository.create(
        owner=owner,
        prompt=prompt,
        system=None,
        model="fake-model",
        temperature=None,
        max_tokens=None,
        metadata={"team": "a"},
        digest="d",
        idempotency_key=key,
        trace_id=None,
        store_text=True,
        status=status,
        task_id=task_id,
    )
