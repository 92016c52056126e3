"""Streams and reasoning models: whether a task is answered as events, the effort asked for,
the parameters the model does not take, the reasoning text and its token count.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("streamed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("reasoning_effort", sa.String(16), nullable=True))
        batch.add_column(sa.Column("dropped_params", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reasoning", sa.Text(), nullable=True))
        batch.add_column(sa.Column("reasoning_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        for column in (
            "reasoning_tokens",
            "reasoning",
            "dropped_params",
            "reasoning_effort",
            "streamed",
        ):
            batch.drop_column(column)
