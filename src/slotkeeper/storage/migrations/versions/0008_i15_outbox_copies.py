"""Gateway mode, several processes: client copies of slot events handed to the delivering process
(their run context), in a table of their own.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox_copies",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("owner", sa.String(36), nullable=False),
        sa.Column("copy", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox_copies"),
    )


def downgrade() -> None:
    op.drop_table("outbox_copies")
