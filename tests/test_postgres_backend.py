"""The transaction handle's contract (``Tx``), on both backends.

On PostgreSQL a transaction runs in pipeline mode: ``write``/``many`` do not wait for their
result and ``pending`` reads travel together, so a failure may surface later than the statement
that caused it. These tests pin down that it still surfaces before anything commits, that
nothing of a failed transaction stays, and that the connection serves the next transaction.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from slotkeeper.errors import NotFound
from slotkeeper.storage import Storage, open_storage
from slotkeeper.storage import queries as q
from slotkeeper.storage.tx import Tx


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    store = open_storage(database_url, pool_size=1)  # one connection: every test reuses it
    try:
        yield store
    finally:
        await store.close()


def _limit(name: str) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "name": name,
        "slot_limit": 2,
        "active": True,
        "created": 1.0,
        "updated": 1.0,
        "pool_slots": 0,
        "pool_clock": 1.0,
        "denied_slots": 0,
        "slot_decay_per_second": 0.0,
        "avg_slot_occupancy_seconds": 2.0,
        "fencing_token": 0,
        "pool_event_id": None,
    }


def _names(tx: Tx) -> list[str]:
    return [r[1] for r in tx.all(q.SELECT_LIMITS_PAGE, {"limit": 100, "offset": 0})]


async def test_a_failing_write_fails_the_transaction_and_nothing_stays(storage: Storage) -> None:
    def op(tx: Tx) -> None:
        tx.write(q.INSERT_LIMIT, _limit("a"))
        tx.write(q.INSERT_LIMIT, _limit("a"))  # the name is taken: fails, but nobody waits for it
        tx.write_many(q.INSERT_LIMIT, [_limit("b")])

    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        await storage.backend.run(op)
    assert await storage.backend.run(_names) == []
    # The same connection serves the next transaction.
    await storage.backend.run(lambda tx: tx.write(q.INSERT_LIMIT, _limit("c")))
    assert await storage.backend.run(_names) == ["c"]


async def test_an_op_that_raises_after_writes_leaves_nothing(storage: Storage) -> None:
    def op(tx: Tx) -> None:
        tx.write(q.INSERT_LIMIT, _limit("a"))
        tx.write_many(q.INSERT_LIMIT, [_limit("b"), _limit("c")])
        raise NotFound("changed its mind")

    with pytest.raises(NotFound):
        await storage.backend.run(op)
    assert await storage.backend.run(_names) == []
    await storage.backend.run(lambda tx: tx.write(q.INSERT_LIMIT, _limit("d")))
    assert await storage.backend.run(_names) == ["d"]


async def test_pending_reads_run_in_order_and_see_earlier_writes(storage: Storage) -> None:
    def op(tx: Tx) -> tuple[list[str], list[str], int, list[str]]:
        first = tx.all_later(q.SELECT_LIMITS_PAGE, {"limit": 100, "offset": 0})
        tx.write(q.INSERT_LIMIT, _limit("a"))
        second = tx.all_later(q.SELECT_LIMITS_PAGE, {"limit": 100, "offset": 0})
        tx.write_many(q.INSERT_LIMIT, [_limit("b")])
        changed = tx.write_now(
            q.UPDATE_LIMIT_AVG, {"id": tx.all(q.SELECT_LIMIT_BY_NAME, {"key": "a"})[0][0], "avg": 3.0}
        )
        third = tx.all_later(q.SELECT_LIMITS_PAGE, {"limit": 100, "offset": 0})
        return [r[1] for r in second()], [r[1] for r in first()], changed, [r[1] for r in third()]

    second, first, changed, third = await storage.backend.run(op)
    assert (first, second, changed, third) == ([], ["a"], 1, ["a", "b"])
    assert await storage.backend.run(_names) == ["a", "b"]


async def test_run_counts_rows_and_a_caught_error_is_the_op_s_to_handle(storage: Storage) -> None:
    await storage.backend.run(lambda tx: tx.write(q.INSERT_LIMIT, _limit("a")))

    def op(tx: Tx) -> str:
        try:
            tx.write_now(q.INSERT_LIMIT, _limit("a"))
        except tx.integrity_error:
            return "conflict"
        return "inserted"

    assert await storage.backend.run(op) == "conflict"
    assert (
        await storage.backend.run(lambda tx: tx.write_now(q.UPDATE_LIMIT_AVG, {"id": "none", "avg": 1.0}))
        == 0
    )
    assert await storage.backend.run(_names) == ["a"]
