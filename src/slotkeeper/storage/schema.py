"""The canonical schema, as SQLAlchemy metadata.

Alembic's migrations (``migrations/versions``) build exactly this schema on SQLite and on
PostgreSQL; ``tests/test_migrations.py`` checks that migrating an empty database yields it.
Times are Unix epoch seconds (double precision) on both backends: no time zone to get wrong, and
the domain works in seconds.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Limit names: ``COLLATE "C"`` on PostgreSQL, as SQLite's default (BINARY) compares them.
NAME = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

#: A named concurrency limit. ``pool_*`` are the unleased slots (see ``slotkeeper.domain``).
limits = sa.Table(
    "limits",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    # Compared byte by byte on both backends (PostgreSQL would otherwise use the database's
    # locale), so limits are listed in the same order everywhere.
    sa.Column("name", NAME, nullable=False, unique=True),
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
    # The acquired event of the latest unleased acquisition: what a plain decrement follows.
    sa.Column("pool_event_id", sa.String(36), nullable=True),
)

#: A lease: slots held by one holder until ``expires``, unless renewed or released.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("expires", sa.Double, nullable=False, index=True),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("holder_type", sa.Text, nullable=True),
    sa.Column("holder_id", sa.Text, nullable=True),
    # NULL: a v2 lease (renewed and released by id). 'v1': a tag-based hold of one task run,
    # released by task run and tags; its slot events are the v1 pair (storage/tags.py).
    sa.Column("kind", sa.Text, nullable=True),
)

#: A grant ties a lease to one limit. Occupancy is the sum of live grants: no counter exists.
grants = sa.Table(
    "grants",
    metadata,
    sa.Column("lease_id", sa.String(36), sa.ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("limit_id", sa.String(36), sa.ForeignKey("limits.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("fencing_token", sa.BigInteger, nullable=False),
    # The acquired event of this grant: its released event follows it, however late.
    sa.Column("acquired_event_id", sa.String(36), nullable=True),
    sa.Index("ix_grants_limit_id", "limit_id"),
)

#: Every event, server-written or ingested. JSON columns are text on both backends.
#: Two secondary indexes, each paid on every event written: ``occurred`` (every query is a range
#: of it, ordered by it; retention) and ``resource_id, occurred`` (``resource.id`` lookups, and
#: ``any_resource.id`` on SQLite). There is no index on the name: see migration 0006.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("occurred", sa.Double, nullable=False, index=True),
    sa.Column("received", sa.Double, nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("resource_id", sa.Text, nullable=False),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("related", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("follows", sa.String(36), nullable=True),
    # Lower-cased name, label values and payload: what the text filter searches.
    sa.Column("search", sa.Text, nullable=False),
    sa.Index("ix_events_resource_id_occurred", "resource_id", "occurred"),
)

#: One row per related resource of an event, for the related and any_resource filters.
event_resources = sa.Table(
    "event_resources",
    metadata,
    sa.Column("event_id", sa.String(36), sa.ForeignKey("events.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("occurred", sa.Double, nullable=False),
    sa.Column("resource_id", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Index("ix_event_resources_resource_id_occurred", "resource_id", "occurred"),
)


#: An acquisition waiting on the server. ``lease_id`` is set when it has been granted and not
#: yet collected by the request that waits for it. ``owner`` is the server process holding the
#: request; its ``heartbeat`` says the request is still there. ``sequence`` is the arrival order,
#: one order across every server process: on PostgreSQL the next value of ``WAITER_SEQUENCE``
#: (drawn while the inserting transaction holds its limits' locks, so the waiters of one limit
#: draw it in commit order), on SQLite the largest plus one (its one writer inserts). The queue
#: is ``(-priority, sequence)``; ``enqueued`` is only a time. ``refused`` says why a wait ended
#: without a grant (a limit it waited for was deleted), until the request that waits reads it.
waiters = sa.Table(
    "waiters",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("enqueued", sa.Double, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("lease_duration", sa.Double, nullable=False),
    sa.Column("holder_type", sa.Text, nullable=True),
    sa.Column("holder_id", sa.Text, nullable=True),
    sa.Column("deadline", sa.Double, nullable=False),
    sa.Column("owner", sa.String(36), nullable=False, index=True),
    sa.Column("heartbeat", sa.Double, nullable=False),
    sa.Column("lease_id", sa.String(36), nullable=True),
    sa.Column("refused", sa.Text, nullable=True),
    sa.Index("ix_waiters_sequence", "sequence", unique=True),
)

#: Where ``waiters.sequence`` comes from on PostgreSQL (SQLite has no sequences: it ignores it).
#: Named in the insert itself, not a column default, so that both backends share the columns.
WAITER_SEQUENCE = sa.Sequence("waiters_sequence_seq", metadata=metadata)

#: The limits one waiter waits for (all found limits of its request).
waiter_limits = sa.Table(
    "waiter_limits",
    metadata,
    sa.Column("waiter_id", sa.String(36), sa.ForeignKey("waiters.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("limit_id", sa.String(36), sa.ForeignKey("limits.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Index("ix_waiter_limits_limit_id", "limit_id"),
)


#: Gateway mode (``SLOTKEEPER_UPSTREAM_URL``): the events slotkeeper committed that the upstream
#: Prefect server has not acknowledged yet, in commit order (``seq``). Written by the transaction
#: that writes the event (``rows.write_events``), deleted once the upstream took it
#: (``gateway/outbox.py``). The event's columns are copied, not joined: retention of ``events``
#: never loses an undelivered event, and delivery never reads the events table.
outbox = sa.Table(
    "outbox",
    metadata,
    # INTEGER PRIMARY KEY is SQLite's rowid (its one writer numbers rows in commit order);
    # BIGSERIAL on PostgreSQL (drawn under the limit locks, so in commit order per limit).
    sa.Column(
        "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    sa.Column("event_id", sa.String(36), nullable=False),
    sa.Column("occurred", sa.Double, nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("related", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("follows", sa.String(36), nullable=True),
)

#: Who delivers the outbox: one process at a time per database (its ``owner`` id) until
#: ``expires``, renewed while it delivers; another process takes over once it has expired.
outbox_lease = sa.Table(
    "outbox_lease",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("owner", sa.String(36), nullable=False),
    sa.Column("expires", sa.Double, nullable=False),
)

#: Several processes (PostgreSQL): the client copies of slot events a process that does not
#: deliver received on its ``/api/events/in`` (their run context, ``gateway/context.py``), for
#: the delivering process, which takes (deletes) them. ``owner`` is the process that received it.
outbox_copies = sa.Table(
    "outbox_copies",
    metadata,
    sa.Column(
        "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    sa.Column("owner", sa.String(36), nullable=False),
    sa.Column("copy", sa.Text, nullable=False),
)
