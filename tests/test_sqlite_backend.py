"""SQLite-specific settings of the backend's connections."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from slotkeeper.storage.dialect import Tx
from slotkeeper.storage.sqlite import SQLiteBackend

MEMORY = 2  # PRAGMA temp_store: 0 default, 1 file, 2 memory


async def test_the_writer_keeps_statement_journals_in_memory_and_readers_do_not(tmp_path: Path) -> None:
    """Every operation of a group runs in a SAVEPOINT: the pages it changes are journalled, in
    memory on the writer. Readers keep SQLite's default, so a large sort does not fill memory."""
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
