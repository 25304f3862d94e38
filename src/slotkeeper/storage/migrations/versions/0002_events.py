"""Events, their related resources, and the links released events follow.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("occurred", sa.Double, nullable=False),
        sa.Column("received", sa.Double, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("related", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("follows", sa.String(36), nullable=True),
        sa.Column("search", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_occurred", "events", ["occurred"])
    op.create_index("ix_events_event_occurred", "events", ["event", "occurred"])
    op.create_index("ix_events_resource_id_occurred", "events", ["resource_id", "occurred"])
    op.create_table(
        "event_resources",
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("occurred", sa.Double, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name="fk_event_resources_event_id_events", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("event_id", "position", name="pk_event_resources"),
    )
    op.create_index("ix_event_resources_resource_id_occurred", "event_resources", ["resource_id", "occurred"])
    with op.batch_alter_table("grants") as batch:
        batch.add_column(sa.Column("acquired_event_id", sa.String(36), nullable=True))
    with op.batch_alter_table("limits") as batch:
        batch.add_column(sa.Column("pool_event_id", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("limits") as batch:
        batch.drop_column("pool_event_id")
    with op.batch_alter_table("grants") as batch:
        batch.drop_column("acquired_event_id")
    op.drop_table("event_resources")
    op.drop_table("events")
