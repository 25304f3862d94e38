"""SQLite-specific behaviour of the backend: its connections' settings, and the events of a
group, inserted together at its commit."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from slotkeeper.errors import DatabaseUnavailable
from slotkeeper.events.models import EventRecord
from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
from slotkeeper.storage import migrate, open_storage
from slotkeeper.storage.dialect import SQLITE
from slotkeeper.storage.rows import write_events
from slotkeeper.storage.sqlite import SQLiteBackend
from slotkeeper.storage.tx import Commit, Tx

MEMORY = 2  # PRAGMA temp_store: 0 default, 1 file, 2 memory


async def test_the_writer_keeps_statement_journals_in_memory_and_readers_do_not(tmp_path: Path) -> None:
    """An operation of a group that must roll back alone runs in a SAVEPOINT: the pages it changes
    are journalled, in memory on the writer. Readers keep SQLite's default, so a large sort does
    not fill memory."""
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    try:

        def temp_store(tx: Tx) -> int:
            row = tx.one("PRAGMA temp_store")
            assert row is not None
            return int(row[0])

        assert await backend.run(temp_store) == MEMORY
        assert await backend.read(temp_store) != MEMORY
    finally:
        await backend.close()


async def test_an_operation_alone_in_its_group_rolls_back_whole(tmp_path: Path) -> None:
    """An operation alone in its group runs without a savepoint: the transaction is its own. If
    it fails, nothing it wrote stays, and the next operation commits as usual."""
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    try:
        await backend.run(lambda tx: tx.write("CREATE TABLE t (x INTEGER PRIMARY KEY)"))

        def write_then_fail(tx: Tx) -> None:
            tx.write("INSERT INTO t VALUES (1)")
            raise RuntimeError("after writing")

        with pytest.raises(RuntimeError, match="after writing"):
            await backend.run(write_then_fail)

        def keep_going_after_a_constraint(tx: Tx) -> int:
            tx.write("INSERT INTO t VALUES (2)")
            with pytest.raises(sqlite3.IntegrityError):
                tx.write("INSERT INTO t VALUES (2)")  # this statement alone is undone
            tx.write("INSERT INTO t VALUES (3)")
            return 0

        await backend.run(keep_going_after_a_constraint)
        rows = await backend.run(lambda tx: tx.all("SELECT x FROM t ORDER BY x"))
        assert [r[0] for r in rows] == [2, 3]
    finally:
        await backend.close()


def _event(name: str, event_id: str | None = None) -> EventRecord:
    return EventRecord(
        id=event_id or str(uuid.uuid4()),
        occurred=1_800_000_000.0,
        event=name,
        resource={"prefect.resource.id": f"r.{name}"},
        related=[{"prefect.resource.id": f"x.{name}", "prefect.resource.role": "x"}],
        received=1_800_000_000.0,
    )


def _count_events(tx: Tx) -> int:
    row = tx.one("SELECT COUNT(*) FROM events")
    assert row is not None
    return int(row[0])


async def test_a_groups_events_are_inserted_at_its_commit(tmp_path: Path) -> None:
    """Server-written events wait for the group's commit (one insert per table, outside the
    savepoints): an operation later in the same group does not see them yet, the next group
    does."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    try:
        first = _event("first")
        written, seen_in_group = await asyncio.gather(
            backend.run(lambda tx: write_events(tx, [first])), backend.run(_count_events)
        )
        assert written == [first]
        assert seen_in_group == 0
        assert await backend.run(_count_events) == 1
        rows = await backend.run(lambda tx: tx.all("SELECT event_id, resource_id FROM event_resources"))
        assert rows == [(first.id, "x.first")]
    finally:
        await backend.close()


async def test_a_failing_operation_in_a_group_rolls_back_alone(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    try:
        await backend.run(lambda tx: tx.write("CREATE TABLE t (x INTEGER PRIMARY KEY)"))

        def insert(x: int, fail: bool = False) -> Callable[[Tx], int]:
            def op(tx: Tx) -> int:
                tx.write("INSERT INTO t VALUES (:x)", {"x": x})
                if fail:
                    raise RuntimeError("after writing")
                return x

            return op

        results = await asyncio.gather(  # started together: one group, one savepoint each
            backend.run(insert(1)),
            backend.run(insert(2, fail=True)),
            backend.run(insert(3)),
            return_exceptions=True,
        )
        assert results[0] == 1 and results[2] == 3 and isinstance(results[1], RuntimeError)
        rows = await backend.run(lambda tx: tx.all("SELECT x FROM t ORDER BY x"))
        assert [r[0] for r in rows] == [1, 3]
    finally:
        await backend.close()


async def test_savepoints_are_spent_only_when_an_operation_fails_after_writing(tmp_path: Path) -> None:
    """A group runs without savepoints; an operation that fails before it has changed a row needs
    none. One that fails after writing makes the group run again, each operation in its own
    savepoint: it alone rolls back, and the others commit once."""
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    statements: list[str] = []
    backend._conn.set_trace_callback(statements.append)
    try:
        await backend.run(lambda tx: tx.write("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
        runs: list[int] = []

        def insert(x: int, fail: str = "") -> Callable[[Tx], int]:
            def op(tx: Tx) -> int:
                runs.append(x)
                if fail == "before":
                    raise LookupError("before writing")
                tx.write("INSERT INTO t VALUES (:x)", {"x": x})
                if fail == "after":
                    raise RuntimeError("after writing")
                return x

            return op

        statements.clear()
        results = await asyncio.gather(  # started together: one group
            backend.run(insert(1)),
            backend.run(insert(2, "before")),
            backend.run(insert(3)),
            return_exceptions=True,
        )
        assert results[0] == 1 and results[2] == 3 and isinstance(results[1], LookupError)
        assert runs == [1, 2, 3]
        assert not [s for s in statements if "SAVEPOINT" in s or "ROLLBACK" in s]

        runs.clear()
        statements.clear()
        results = await asyncio.gather(
            backend.run(insert(4)),
            backend.run(insert(5, "after")),
            backend.run(insert(6)),
            return_exceptions=True,
        )
        assert results[0] == 4 and results[2] == 6 and isinstance(results[1], RuntimeError)
        assert runs == [4, 5, 4, 5, 6]  # the first try stopped at 5; then each in a savepoint
        assert statements.count("ROLLBACK") == 1 and statements.count("SAVEPOINT op") == 3
        rows = await backend.run(lambda tx: tx.all("SELECT x FROM t ORDER BY x"))
        assert [r[0] for r in rows] == [1, 3, 4, 6]
    finally:
        await backend.close()


async def test_a_group_whose_events_cannot_be_inserted_commits_nothing(tmp_path: Path) -> None:
    """The deferred insert runs before the COMMIT: if it fails, the whole group fails (every
    future gets the error), nothing is stored or published, and the next group is unaffected."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    published: list[Commit | None] = []
    backend.subscribe(published.append)
    try:
        clash = str(uuid.uuid4())

        def limit_and_event(tx: Tx) -> None:  # another write of the same group goes too
            tx.write(
                "INSERT INTO limits (id, name, slot_limit, active, created, updated, pool_slots,"
                " pool_clock, denied_slots, slot_decay_per_second, avg_slot_occupancy_seconds,"
                " fencing_token) VALUES ('l1', 'l1', 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)"
            )
            write_events(tx, [_event("a", clash)])

        results = await asyncio.gather(
            backend.run(limit_and_event),
            backend.run(lambda tx: write_events(tx, [_event("b", clash)])),
            return_exceptions=True,
        )
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results)
        assert await backend.run(_count_events) == 0
        assert await backend.run(lambda tx: tx.all("SELECT id FROM limits")) == []
        assert published == []
        after = _event("after")
        assert await backend.run(lambda tx: write_events(tx, [after])) == [after]
        assert await backend.run(lambda tx: tx.all("SELECT id FROM events")) == [(after.id,)]
        assert [e.id for c in published if c is not None for e in c.events] == [after.id]
    finally:
        await backend.close()


def test_deferred_rows_roll_back_with_their_savepoint_and_flush_in_statement_order() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE parent (id TEXT PRIMARY KEY)")
    conn.execute("CREATE TABLE child (parent_id TEXT REFERENCES parent (id), n INTEGER)")
    conn.execute("PRAGMA foreign_keys=ON")
    tx = Tx(conn.cursor(), SQLITE, sqlite3.IntegrityError, defer=True)
    parent, child = "INSERT INTO parent (id) VALUES (:id)", "INSERT INTO child VALUES (:id, :n)"
    conn.execute("BEGIN")
    tx.insert_at_commit(parent, [{"id": "p1"}])
    tx.insert_at_commit(child, [{"id": "p1", "n": 1}])
    mark = tx.mark()
    tx.insert_at_commit(parent, [{"id": "lost"}])
    tx.rollback_to(mark)
    tx.insert_at_commit(parent, [{"id": "p2"}])  # after a child row: still inserted before the children
    tx.insert_at_commit(child, [{"id": "p2", "n": 2}])
    assert conn.execute("SELECT COUNT(*) FROM parent").fetchone() == (0,)
    tx.flush()
    conn.execute("COMMIT")
    assert conn.execute("SELECT id FROM parent ORDER BY id").fetchall() == [("p1",), ("p2",)]
    assert conn.execute("SELECT parent_id, n FROM child ORDER BY n").fetchall() == [("p1", 1), ("p2", 2)]
    tx.flush()  # nothing left: a no-op
    immediate = Tx(conn.cursor(), SQLITE, sqlite3.IntegrityError)
    immediate.insert_at_commit(parent, [{"id": "p3"}])  # without defer: inserted at once
    assert conn.execute("SELECT COUNT(*) FROM parent").fetchone() == (3,)


async def test_run_queues_the_operation_before_it_is_awaited(tmp_path: Path) -> None:
    """``run`` hands the operation to the next group at once and answers with that group's
    future (``backend.send``: an acquisition awaits it with no task around it). The operation
    runs even if nobody awaits the future, and cancelling the future drops only the outcome."""
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    try:
        await backend.run(lambda tx: tx.write("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
        first = backend.run(lambda tx: tx.write("INSERT INTO t VALUES (1)"))
        dropped = backend.run(lambda tx: tx.write("INSERT INTO t VALUES (2)"))
        assert isinstance(first, asyncio.Future)
        dropped.cancel()
        await first

        def rows(tx: Tx) -> list[int]:
            return [int(r[0]) for r in tx.all("SELECT x FROM t ORDER BY x")]

        assert await backend.run(rows) == [1, 2]
    finally:
        await backend.close()


async def test_an_acquisition_raises_an_unavailable_database_as_database_unavailable(tmp_path: Path) -> None:
    """The driver's "cannot serve this now" errors reach an acquisition on the group's own future
    (not through ``backend.run``'s translation): the acquisition turns them into
    ``DatabaseUnavailable`` itself; other errors pass unchanged."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    storage = open_storage(url)
    try:
        await storage.create_limit(LimitSpec(name="db", limit=1))
        request = AcquireRequest(["db"], 1, lease=LeaseSpec(30.0))

        def unavailable(tx: Tx, names: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        def broken(tx: Tx, names: object) -> None:
            raise RuntimeError("a bug")

        scripts = storage.scripts
        original = scripts.send_lock_reads
        scripts.send_lock_reads = unavailable  # type: ignore[method-assign,assignment]
        with pytest.raises(DatabaseUnavailable, match="disk I/O error"):
            await storage.acquire(request)
        scripts.send_lock_reads = broken  # type: ignore[method-assign,assignment]
        with pytest.raises(RuntimeError, match="a bug"):
            await storage.acquire(request)
        scripts.send_lock_reads = original  # type: ignore[method-assign]
        granted = await storage.acquire(request)
        assert granted.lease_id is not None
    finally:
        await storage.close()
