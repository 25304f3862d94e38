"""SQLite-specific settings of the backend's connections."""

from __future__ import annotations

from pathlib import Path

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
