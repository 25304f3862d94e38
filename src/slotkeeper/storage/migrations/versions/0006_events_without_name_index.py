"""Events: drop the ``(event, occurred)`` index, the one whose writes bought least.

Every event row updated it, and it served one filter only: exact names (``event.name``). Name
prefixes, the form Prefect's UI filters by, compile to a ``substr`` comparison no index serves,
and for a common name (every slot event is one of four) the index was worse than none: SQLite
read every match in the range through it and sorted them, where the ``occurred`` index stops after one
page. Measured costs and plans are in docs/benchmarks.md ("Cost of events").

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_events_event_occurred", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_event_occurred", "events", ["event", "occurred"])
