"""Waiters: an arrival sequence (the queue's tie-break) and why a wait was refused; limit names
compared byte by byte on PostgreSQL (``COLLATE "C"``), as on SQLite.

Waiters queued before the upgrade are numbered in their old order (``enqueued``, then id).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Added empty, numbered, then made NOT NULL: no default serves both backends.
    with op.batch_alter_table("waiters") as batch:
        batch.add_column(sa.Column("sequence", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("refused", sa.Text, nullable=True))
    op.execute(
        "UPDATE waiters SET sequence = (SELECT COUNT(*) FROM waiters o "
        "WHERE o.enqueued < waiters.enqueued OR (o.enqueued = waiters.enqueued AND o.id <= waiters.id))"
    )
    with op.batch_alter_table("waiters") as batch:
        batch.alter_column("sequence", existing_type=sa.BigInteger, nullable=False)
    op.create_index("ix_waiters_sequence", "waiters", ["sequence"], unique=True)
    if op.get_bind().dialect.name == "postgresql":
        # Goes on after the waiters numbered above.
        op.execute(sa.schema.CreateSequence(sa.Sequence("waiters_sequence_seq")))
        op.execute(
            "SELECT setval('waiters_sequence_seq', (SELECT COALESCE(MAX(sequence), 0) + 1 FROM waiters), false)"
        )
        op.alter_column("limits", "name", type_=sa.Text(collation="C"), existing_nullable=False)


def downgrade() -> None:
    op.drop_index("ix_waiters_sequence", table_name="waiters")
    with op.batch_alter_table("waiters") as batch:
        batch.drop_column("refused")
        batch.drop_column("sequence")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("waiters_sequence_seq")))
        op.alter_column("limits", "name", type_=sa.Text(), existing_nullable=False)
