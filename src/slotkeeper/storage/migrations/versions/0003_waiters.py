"""The server-side wait queue.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "waiters",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("enqueued", sa.Double, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("lease_duration", sa.Double, nullable=False),
        sa.Column("holder_type", sa.Text, nullable=True),
        sa.Column("holder_id", sa.Text, nullable=True),
        sa.Column("deadline", sa.Double, nullable=False),
        sa.Column("owner", sa.String(36), nullable=False),
        sa.Column("heartbeat", sa.Double, nullable=False),
        sa.Column("lease_id", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_waiters"),
    )
    op.create_index("ix_waiters_owner", "waiters", ["owner"])
    op.create_table(
        "waiter_limits",
        sa.Column("waiter_id", sa.String(36), nullable=False),
        sa.Column("limit_id", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["waiter_id"], ["waiters.id"], name="fk_waiter_limits_waiter_id_waiters", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["limit_id"], ["limits.id"], name="fk_waiter_limits_limit_id_limits", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("waiter_id", "limit_id", name="pk_waiter_limits"),
    )
    op.create_index("ix_waiter_limits_limit_id", "waiter_limits", ["limit_id"])


def downgrade() -> None:
    op.drop_table("waiter_limits")
    op.drop_table("waiters")
