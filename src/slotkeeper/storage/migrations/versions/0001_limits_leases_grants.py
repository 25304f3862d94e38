"""Limits, leases and grants.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "limits",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("slot_limit", sa.Integer, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("pool_slots", sa.Integer, nullable=False),
        sa.Column("pool_clock", sa.Double, nullable=False),
        sa.Column("denied_slots", sa.Integer, nullable=False),
        sa.Column("slot_decay_per_second", sa.Double, nullable=False),
        sa.Column("avg_slot_occupancy_seconds", sa.Double, nullable=False),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limits"),
        sa.UniqueConstraint("name", name="uq_limits_name"),
    )
    op.create_table(
        "leases",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("expires", sa.Double, nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("holder_type", sa.Text, nullable=True),
        sa.Column("holder_id", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_leases"),
    )
    op.create_index("ix_leases_expires", "leases", ["expires"])
    op.create_table(
        "grants",
        sa.Column("lease_id", sa.String(36), nullable=False),
        sa.Column("limit_id", sa.String(36), nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(
            ["lease_id"], ["leases.id"], name="fk_grants_lease_id_leases", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["limit_id"], ["limits.id"], name="fk_grants_limit_id_limits", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("lease_id", "limit_id", name="pk_grants"),
    )
    op.create_index("ix_grants_limit_id", "grants", ["limit_id"])


def downgrade() -> None:
    op.drop_table("grants")
    op.drop_table("leases")
    op.drop_table("limits")
