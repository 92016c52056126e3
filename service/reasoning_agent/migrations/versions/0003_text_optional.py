"""Lengths and hashes of prompt and answer, so STORE_PROMPTS=false can keep those without text.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("prompt", existing_type=sa.Text(), nullable=True)
        batch.add_column(sa.Column("prompt_chars", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("prompt_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("answer_chars", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("answer_sha256", sa.String(64), nullable=True))
    op.create_index("ix_tasks_created", "tasks", ["created_at"])
    op.create_index("ix_tasks_status_created", "tasks", ["status", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_created", "tasks")
    op.drop_index("ix_tasks_created", "tasks")
    with op.batch_alter_table("tasks") as batch:
        for column in ("answer_sha256", "answer_chars", "prompt_sha256", "prompt_chars"):
            batch.drop_column(column)
        batch.alter_column("prompt", existing_type=sa.Text(), nullable=False)
