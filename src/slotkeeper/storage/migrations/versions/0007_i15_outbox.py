"""Gateway mode: the outbox of events waiting for the upstream Prefect server, and its lease.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("occurred", sa.Double, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("related", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("follows", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox"),
    )
    op.create_table(
        "outbox_lease",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("owner", sa.String(36), nullable=False),
        sa.Column("expires", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_outbox_lease"),
    )


def downgrade() -> None:
    op.drop_table("outbox_lease")
    op.drop_table("outbox")
