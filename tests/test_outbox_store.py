"""The outbox in storage (gateway mode): what commits is queued, in commit order, in the same
transaction; the delivery lease gives one deliverer at a time. Every test runs on both backends."""

from __future__ import annotations

import asyncio

import pytest

from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import LimitSpec
from slotkeeper.storage import Storage, queries
from slotkeeper.storage.rows import write_events
from slotkeeper.storage.tx import Tx
from tests.conftest import FakeClock, take


async def test_nothing_is_queued_unless_enabled(storage: Storage) -> None:
    await storage.create_limit(LimitSpec(name="db", limit=2))
    await take(storage)
    assert await storage.outbox_store().oldest(10) == []


async def test_every_committed_server_event_is_queued_in_commit_order(storage: Storage) -> None:
    outbox = storage.outbox_store()
    outbox.enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    granted = await take(storage)
    assert await storage.release_lease(granted.lease_id)
    queued = await outbox.oldest(10)
    ids = [q.event.id for q in queued]
    rows = await storage.backend.run(lambda tx: tx.all(queries.SELECT_EVENTS_BY_IDS, {"ids": ids}))
    by_id = {e.id: e for e in map(EventRecord.from_row, rows)}
    assert [q.event.event for q in queued] == [builders.CREATED, builders.ACQUIRED, builders.RELEASED]
    assert [q.seq for q in queued] == sorted(q.seq for q in queued)
    for q in queued:  # the same event, id included, as the store holds
        kept = by_id[q.event.id]
        assert (q.event.occurred, q.event.resource, q.event.related, q.event.payload, q.event.follows) == (
            kept.occurred,
            kept.resource,
            kept.related,
            kept.payload,
            kept.follows,
        )
    assert queued[2].event.follows == queued[1].event.id


async def test_a_rolled_back_script_queues_nothing(storage: Storage) -> None:
    outbox = storage.outbox_store()
    outbox.enable()
    lim = await storage.create_limit(LimitSpec(name="db", limit=2))
    before = await outbox.oldest(10)

    class Refused(Exception):
        pass

    def script(tx: Tx) -> None:
        write_events(tx, [builders.lifecycle_event(builders.UPDATED, lim.limit, 1.0)])
        raise Refused

    with pytest.raises(Refused):
        await storage.backend.run(script)
    assert [q.seq for q in await outbox.oldest(10)] == [q.seq for q in before]


async def test_delivered_events_are_deleted_and_the_others_stay(storage: Storage) -> None:
    outbox = storage.outbox_store()
    outbox.enable()
    await storage.create_limit(LimitSpec(name="db", limit=5))
    for _ in range(3):
        await take(storage)
    queued = await outbox.oldest(10)
    assert len(queued) == 4
    assert (await outbox.backlog()).events == 4
    await outbox.delivered([queued[0].seq, queued[2].seq])
    left = await outbox.oldest(10)
    assert [q.seq for q in left] == [queued[1].seq, queued[3].seq]
    backlog = await outbox.backlog()
    assert backlog.events == 2
    assert backlog.oldest == queued[1].event.occurred
    assert [q.seq for q in await outbox.oldest(1)] == [queued[1].seq]


async def test_one_deliverer_at_a_time_until_its_lease_expires(storage: Storage, clock: FakeClock) -> None:
    outbox = storage.outbox_store()
    assert await outbox.claim("a", 10)
    assert not await outbox.claim("b", 10)
    assert await outbox.claim("a", 10)  # renewed
    clock.advance(9.9)
    assert not await outbox.claim("b", 10)
    clock.advance(10.0)  # a stopped renewing: b takes over, and a has lost it
    assert await outbox.claim("b", 10)
    assert not await outbox.claim("a", 10)


async def test_a_freed_lease_is_taken_at_once(storage: Storage) -> None:
    outbox = storage.outbox_store()
    assert await outbox.claim("a", 10)
    await outbox.free("b")  # not b's: nothing changes
    assert not await outbox.claim("b", 10)
    await outbox.free("a")
    assert await outbox.claim("b", 10)


async def test_backlog_of_an_empty_outbox(storage: Storage) -> None:
    backlog = await storage.outbox_store().backlog()
    assert (backlog.events, backlog.oldest) == (0, None)


async def test_client_copies_go_to_the_other_processes_once(storage: Storage) -> None:
    outbox = storage.outbox_store()
    await outbox.share_copies("a", ['{"n": 1}', '{"n": 2}'])
    await outbox.share_copies("b", ['{"n": 3}'])
    assert await outbox.take_copies("a") == ['{"n": 3}']  # not its own
    assert await outbox.take_copies("b", batch=1) == ['{"n": 1}']
    assert await outbox.take_copies("b") == ['{"n": 2}']
    assert await outbox.take_copies("b") == []


async def test_operations_committed_together_queue_every_event(storage: Storage) -> None:
    """Concurrent acquisitions commit in groups (SQLite always, PostgreSQL under load): each
    group's events are queued with it."""
    outbox = storage.outbox_store()
    outbox.enable()
    for i in range(32):
        await storage.create_limit(LimitSpec(name=f"l{i}", limit=2))
    await asyncio.gather(*(take(storage, f"l{i}") for i in range(32)))
    queued = {q.event.id for q in await outbox.oldest(1000)}
    rows = await storage.backend.run(lambda tx: tx.all("SELECT id FROM events"))
    assert queued == {r[0] for r in rows}
    assert len(queued) == 64
