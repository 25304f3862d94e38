"""Live fan-out: the broker on its own, and how each backend publishes committed events.

* :class:`~slotkeeper.events.broker.Broker`: predicates, order, bounded queues, overflow
  (counted, only the slow subscriber is cut off), interruption.
* ``Backend.subscribe`` on SQLite and PostgreSQL: what committed is published once, in commit
  order; what rolled back is neither stored nor published; on PostgreSQL a batch too large for
  one ``NOTIFY`` travels as ids over several notifications and arrives whole and in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Callable

import orjson
import pytest

from slotkeeper.events.broker import INTERRUPTED, OVERFLOWED, OVERFLOWED_BYTES, Broker, event_bytes
from slotkeeper.events.models import EventRecord
from slotkeeper.storage import Storage
from slotkeeper.storage.rows import write_events
from slotkeeper.storage.tx import Commit, Tx

BOUND = 30.0  # seconds: a bound on a broken backend, never an expectation


def record(
    name: str = "test.event", resource: str = "r.1", payload: dict[str, object] | None = None
) -> EventRecord:
    return EventRecord(
        id=str(uuid.uuid4()),
        occurred=1_800_000_000.0,
        event=name,
        resource={"prefect.resource.id": resource},
        payload=payload or {},
        received=1_800_000_000.0,
    )


# --- the broker -------------------------------------------------------------------------------------


async def test_each_subscriber_gets_what_its_predicate_accepts_in_order() -> None:
    broker = Broker(queue_size=10)
    every = broker.subscribe(lambda e: True)
    only_b = broker.subscribe(lambda e: e.resource_id == "b")
    batch = [record(resource=r) for r in "abab"]
    broker.publish(batch[:2])
    broker.publish(batch[2:])
    assert [await every.next() for _ in batch] == batch
    assert [await only_b.next(), await only_b.next()] == [batch[1], batch[3]]
    with pytest.raises(asyncio.QueueEmpty):
        only_b.get_nowait()
    assert broker.subscribers == 2
    assert broker.overflows == 0


async def test_a_full_queue_cuts_off_that_subscriber_only_and_is_counted() -> None:
    broker = Broker(queue_size=2)
    slow = broker.subscribe(lambda e: True)
    narrow = broker.subscribe(lambda e: e.event == "wanted")
    batch = [record("flood"), record("flood"), record("flood"), record("wanted")]
    broker.publish(batch)
    # What fitted is still delivered, then the end (None) with its reason.
    assert [await slow.next(), await slow.next(), await slow.next()] == [batch[0], batch[1], None]
    assert slow.ended == OVERFLOWED
    assert await slow.next() is None  # and it stays ended
    assert broker.overflows == 1
    assert broker.subscribers == 1
    # The other subscriber is untouched and keeps receiving.
    assert await narrow.next() == batch[3]
    later = record("wanted")
    broker.publish([later])
    assert await narrow.next() == later
    assert narrow.ended is None


async def test_a_queue_is_bounded_by_bytes_too() -> None:
    """A few large events fill a queue long before its count (issue 11, defect 5)."""
    big = [record("big", payload={"blob": "x" * 10_000}) for _ in range(4)]
    small = record("small")
    room = 2 * event_bytes(big[0]) + event_bytes(small)
    broker = Broker(queue_size=1000, queue_bytes=room)
    slow = broker.subscribe(lambda e: True)
    narrow = broker.subscribe(lambda e: e.event == "small")
    broker.publish([big[0], small, big[1], big[2], big[3]])
    assert [await slow.next() for _ in range(4)] == [big[0], small, big[1], None]
    assert slow.ended == OVERFLOWED_BYTES
    assert broker.overflows == 1
    assert await narrow.next() == small  # cut off alone
    assert broker.subscribers == 1


async def test_reading_gives_the_bytes_back() -> None:
    event = record(payload={"blob": "x" * 1000})
    broker = Broker(queue_size=1000, queue_bytes=event_bytes(event))
    subscription = broker.subscribe(lambda e: True)
    for _ in range(20):  # one event fits at a time, so each must have been given back
        broker.publish([event])
        assert subscription.queued_bytes == event_bytes(event)
        assert subscription.get_nowait() == event
        assert subscription.queued_bytes == 0
    assert subscription.ended is None


def test_event_bytes_is_about_the_json_size() -> None:
    for payload in ({}, {"blob": "x" * 100_000}, {"n": list(range(1000))}):
        event = record(payload=payload)
        size = len(orjson.dumps(event.wire()))
        assert size <= event_bytes(event) <= size + 512


async def test_a_subscriber_that_drains_its_queue_is_never_cut_off() -> None:
    broker = Broker(queue_size=2)
    subscription = broker.subscribe(lambda e: True)
    for _ in range(50):
        events = [record(), record()]
        broker.publish(events)
        assert [subscription.get_nowait(), subscription.get_nowait()] == events
    assert (broker.overflows, subscription.ended) == (0, None)


async def test_a_lost_upstream_interrupts_every_subscriber() -> None:
    broker = Broker()
    subscriptions = [broker.subscribe(lambda e: True) for _ in range(3)]
    broker.publish([record()])
    broker.publish(None)
    for subscription in subscriptions:
        assert (await subscription.next()).event == "test.event"  # type: ignore[union-attr]
        assert await subscription.next() is None
        assert subscription.ended == INTERRUPTED
    assert broker.subscribers == 0
    assert broker.overflows == 0


async def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    broker = Broker()
    subscription = broker.subscribe(lambda e: True)
    broker.unsubscribe(subscription)
    broker.unsubscribe(subscription)
    broker.publish([record()])
    with pytest.raises(asyncio.QueueEmpty):
        subscription.get_nowait()
    assert broker.subscribers == 0


async def test_a_waiting_reader_is_woken_by_the_next_event() -> None:
    broker = Broker()
    subscription = broker.subscribe(lambda e: True)
    waiting = asyncio.ensure_future(subscription.next())
    await asyncio.sleep(0)
    assert not waiting.done()
    event = record()
    broker.publish([event])
    assert await asyncio.wait_for(waiting, BOUND) == event


# --- how the backends publish -------------------------------------------------------------------------


class Collected:
    """What a backend's subscription delivered (from whatever thread it calls back on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.commits: list[Commit | None] = []

    def __call__(self, commit: Commit | None) -> None:
        with self._lock:
            self.commits.append(commit)

    @property
    def events(self) -> list[EventRecord]:
        with self._lock:
            return [e for c in self.commits if c is not None for e in c.events]

    async def until(self, count: int) -> list[EventRecord]:
        """The delivered events once there are ``count`` (bounded polling)."""
        for _ in range(int(BOUND / 0.01)):
            if len(self.events) >= count:
                return self.events
            await asyncio.sleep(0.01)
        pytest.fail(f"only {len(self.events)} of {count} events were published")


@pytest.fixture
async def published(storage: Storage) -> Collected:
    collected = Collected()
    unsubscribe = storage.backend.subscribe(collected)
    yield collected  # type: ignore[misc]
    unsubscribe()


def writer(events: list[EventRecord], fail: bool = False) -> Callable[[Tx], int]:
    def op(tx: Tx) -> int:
        write_events(tx, events)
        if fail:
            raise RuntimeError("rolled back after writing")
        return len(events)

    return op


async def stored_ids(storage: Storage) -> set[str]:
    rows = await storage.backend.run(lambda tx: tx.all("SELECT id FROM events"))
    return {r[0] for r in rows}


async def test_commits_are_published_once_in_commit_order(storage: Storage, published: Collected) -> None:
    batches = [[record(resource=f"r.{i}.{j}") for j in range(i % 3 + 1)] for i in range(10)]
    for batch in batches:  # one after the other: the commit order is this order
        await storage.backend.run(writer(batch))
    flat = [e for batch in batches for e in batch]
    assert await published.until(len(flat)) == flat
    assert None not in published.commits


async def kept_lost_after(
    storage: Storage, kept: list[EventRecord], lost: list[EventRecord], after: list[EventRecord]
) -> list[int | BaseException]:
    """Three writers started together (on SQLite: one group commit, a savepoint each), the middle
    one failing after it wrote ``lost``: their results, or the error."""
    return list(
        await asyncio.gather(
            storage.backend.run(writer(kept)),
            storage.backend.run(writer(lost, fail=True)),
            storage.backend.run(writer(after)),
            return_exceptions=True,
        )
    )


async def test_a_rolled_back_transaction_publishes_and_stores_nothing(
    storage: Storage, published: Collected
) -> None:
    kept, lost, after = [record("kept")], [record("lost"), record("lost")], [record("after")]
    # Started together: on SQLite they share one group commit, each in its own savepoint.
    results = await kept_lost_after(storage, kept, lost, after)
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], RuntimeError)
    events = await published.until(2)
    assert sorted(e.event for e in events) == ["after", "kept"]
    assert await stored_ids(storage) == {kept[0].id, after[0].id}
    # Nothing of the rolled-back one turns up later either.
    marker = [record("marker")]
    await storage.backend.run(writer(marker))
    assert [e.event for e in await published.until(3)].count("lost") == 0


async def test_related_resources_are_stored_exactly_for_the_committed_events(
    storage: Storage, published: Collected
) -> None:
    def related(event: EventRecord, *ids: str) -> EventRecord:
        resources = [{"prefect.resource.id": i, "prefect.resource.role": "flow-run"} for i in ids]
        return dataclasses.replace(event, related=resources)

    kept = [related(record("kept"), "a.1", "a.2"), record("kept")]
    lost = [related(record("lost"), "b.1")]
    after = [related(record("after"), "c.1")]
    # One SQLite group: the events of all three are inserted at its commit, the rolled-back one's
    # not at all; each related row needs its event's row (foreign key).
    results = await kept_lost_after(storage, kept, lost, after)
    assert results[0] == 2 and results[2] == 1
    assert isinstance(results[1], RuntimeError)
    assert sorted(e.event for e in await published.until(3)) == ["after", "kept", "kept"]
    rows = await storage.backend.run(
        lambda tx: tx.all("SELECT event_id, position, resource_id FROM event_resources")
    )
    assert sorted(rows) == sorted([(kept[0].id, 0, "a.1"), (kept[0].id, 1, "a.2"), (after[0].id, 0, "c.1")])
    assert await stored_ids(storage) == {kept[0].id, kept[1].id, after[0].id}


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(("count", "payload_bytes"), [(30, 400), (400, 10)])
async def test_postgres_batches_too_large_for_one_notify_arrive_whole_and_in_order(
    storage: Storage, published: Collected, count: int, payload_bytes: int
) -> None:
    assert storage.backend.name == "postgresql"
    # 30 events of ~400 bytes: over one NOTIFY's budget, sent as ids; 400 events: several
    # notifications of ids, one transaction all the same.
    batch = [record(resource=f"r.{i}", payload={"pad": "x" * payload_bytes}) for i in range(count)]
    before = [record("before")]
    after = [record("after")]
    await storage.backend.run(writer(before))
    await storage.backend.run(writer(batch))
    await storage.backend.run(writer(after))
    events = await published.until(count + 2)
    assert events == [*before, *batch, *after]  # read back from the table: equal records
