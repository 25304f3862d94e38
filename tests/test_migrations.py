"""Migrations: from an empty database they build exactly the canonical schema, on both backends.

``slotkeeper.storage.schema.metadata`` is the schema the code is written against; the Alembic
revisions are how a database gets there. Autogenerate's comparison must find nothing to change.
PostgreSQL tests run in a database of their own, created and dropped here, so they never touch
the shared test database.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import slotkeeper.storage
from slotkeeper.storage import migrate, queries, schema
from slotkeeper.storage.dialect import POSTGRES, SQLITE
from slotkeeper.storage.schema import metadata

DIALECTS = {d.name: d for d in (SQLITE, POSTGRES)}

MIGRATIONS = Path(slotkeeper.storage.__file__).parent / "migrations"


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return sa.create_engine(url, poolclass=sa.pool.NullPool)
    return sa.create_engine("postgresql+psycopg://" + url.split("://", 1)[1], poolclass=sa.pool.NullPool)


def _config_without_connection() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _config(connection: sa.Connection) -> Config:
    config = _config_without_connection()
    config.attributes["connection"] = connection
    return config


def _diff(url: str) -> list[Any]:
    """What autogenerate would change to make the database match ``metadata``."""
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _snapshot(url: str) -> dict[str, Any]:
    """Tables, columns, indexes and foreign keys as the database reports them, plus the revision."""
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            tables = {
                name: (
                    [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
                    sorted(str(sorted(i.items())) for i in inspector.get_indexes(name)),
                    sorted(str(sorted(fk.items())) for fk in inspector.get_foreign_keys(name)),
                )
                for name in inspector.get_table_names()
            }
            version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            return {"tables": tables, "version": version}
    finally:
        engine.dispose()


def _table_names(url: str) -> set[str]:
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A newly created, empty PostgreSQL database, dropped afterwards."""
    name = f"slotkeeper_migr_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(postgres_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, never migrated, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


def test_an_empty_database_differs_from_the_schema(empty_url: str) -> None:
    # The comparison sees missing tables: an empty diff below means something.
    if empty_url.startswith("sqlite"):
        Path(empty_url.removeprefix("sqlite:///")).touch()
    diff = _diff(empty_url)
    added = {d[1].name for d in diff if d[0] == "add_table"}
    assert added == set(metadata.tables)


def test_migrating_an_empty_database_yields_the_schema(empty_url: str) -> None:
    migrate(empty_url)
    assert _diff(empty_url) == []
    assert _table_names(empty_url) == {*metadata.tables, "alembic_version"}


def test_migrating_yields_what_autogenerate_does_not_compare(empty_url: str) -> None:
    """Column collations (limit names compare byte by byte on PostgreSQL too) and sequences
    (PostgreSQL's arrival order of waiters): the comparison above passes without them."""
    migrate(empty_url)
    engine = _engine(empty_url)
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            dialect = connection.dialect
            collations = {
                (table, column["name"]): getattr(column["type"], "collation", None)
                for table in metadata.tables
                for column in inspector.get_columns(table)
            }
            sequences = set(inspector.get_sequence_names()) if dialect.name == "postgresql" else set()
    finally:
        engine.dispose()
    assert collations == {
        (table.name, column.name): getattr(column.type.dialect_impl(dialect), "collation", None)
        for table in metadata.tables.values()
        for column in table.columns
    }
    if dialect.name == "postgresql":
        assert collations["limits", "name"] == "C"
        # The outbox's BIGSERIAL numbers its rows (gateway mode, migration 0007).
        assert sequences == {schema.WAITER_SEQUENCE.name, "outbox_seq_seq", "outbox_copies_seq_seq"}


def test_waiters_queued_before_the_arrival_sequence_keep_their_order(empty_url: str) -> None:
    """0005 numbers the waiters already queued in their old order (time, then id), and the
    waiters queued after them come after them."""
    migrate(empty_url, "0004")
    engine = _engine(empty_url)
    columns = {
        "priority": 0,
        "slots": 1,
        "lease_duration": 60.0,
        "deadline": 9.0,
        "owner": "o",
        "heartbeat": 1.0,
    }
    try:
        with engine.begin() as connection:
            for waiter_id, enqueued in [("w-b", 2.0), ("w-c", 1.0), ("w-a", 2.0)]:
                connection.execute(
                    sa.text(
                        "INSERT INTO waiters (id, enqueued, priority, slots, lease_duration, deadline, "
                        "owner, heartbeat) VALUES (:id, :enqueued, :priority, :slots, :lease_duration, "
                        ":deadline, :owner, :heartbeat)"
                    ),
                    {"id": waiter_id, "enqueued": enqueued, **columns},
                )
        migrate(empty_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    queries.INSERT_WAITER.replace(
                        "NEXT_WAITER_SEQUENCE", DIALECTS[engine.dialect.name].next_waiter_sequence
                    )
                ),
                {"id": "w-0", "enqueued": 0.0, "holder_type": None, "holder_id": None, **columns},
            )
            rows = connection.execute(sa.text("SELECT id, sequence FROM waiters ORDER BY sequence")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [("w-c", 1), ("w-a", 2), ("w-b", 3), ("w-0", 4)]


def test_migrating_stops_at_the_head_revision(empty_url: str) -> None:
    migrate(empty_url)
    head = ScriptDirectory.from_config(_config_without_connection()).get_current_head()
    assert head is not None
    assert _snapshot(empty_url)["version"] == head


def test_migrating_twice_is_a_no_op(empty_url: str) -> None:
    migrate(empty_url)
    engine = _engine(empty_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.insert(metadata.tables["limits"]).values(
                    id="00000000-0000-0000-0000-000000000001",
                    name="kept",
                    slot_limit=3,
                    active=True,
                    created=1.0,
                    updated=1.0,
                    pool_slots=2,
                    pool_clock=1.0,
                    denied_slots=0,
                    slot_decay_per_second=0.0,
                    avg_slot_occupancy_seconds=2.0,
                    fencing_token=7,
                )
            )
    finally:
        engine.dispose()
    before = _snapshot(empty_url)
    migrate(empty_url)
    assert _snapshot(empty_url) == before
    assert _diff(empty_url) == []
    engine = _engine(empty_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT name, pool_slots, fencing_token FROM limits")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [("kept", 2, 7)]


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    migrate(empty_url)
    engine = _engine(empty_url)
    try:
        with engine.begin() as connection:
            command.downgrade(_config(connection), "base")
    finally:
        engine.dispose()
    assert _table_names(empty_url) <= {"alembic_version"}
    migrate(empty_url)
    assert _diff(empty_url) == []


def test_each_revision_upgrades_from_the_previous(empty_url: str) -> None:
    script = ScriptDirectory.from_config(_config_without_connection())
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert len(revisions) >= 1
    for revision in revisions:
        migrate(empty_url, revision)
        assert _snapshot(empty_url)["version"] == revision
    assert _diff(empty_url) == []
