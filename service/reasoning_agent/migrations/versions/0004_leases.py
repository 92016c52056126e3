"""Leases on unfinished tasks: who holds each one and until when, and how often it was tried.

Rows written before this revision have no lease; the sweep gives them LEGACY_HORIZON.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from reasoning_agent.tasks.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("holder", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_until", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("started_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("tries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        for column in ("tries", "started_at", "lease_until", "holder"):
            batch.drop_column(column)
