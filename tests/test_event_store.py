"""EventStore on both backends: ingest (de-duplication, slot-event copies), query, count-by,
retention. Count-by's pure arithmetic is tested without a database at the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from slotkeeper.events import builders
from slotkeeper.events.filters import with_defaults
from slotkeeper.events.models import EventFilter, EventRecord
from slotkeeper.models import AcquireRequest, LimitSpec
from slotkeeper.storage import Storage
from slotkeeper.storage.events import (
    PIVOT,
    Countable,
    EventStore,
    InvalidCountRequest,
    TimeUnit,
    check_buckets,
    end_of_period,
    labelled_counts,
    run_retention,
    time_counts,
    unstorable,
)
from tests.conftest import FakeClock

HOUR = 3600.0
ALL_TIME = {"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}


@pytest.fixture
async def store(storage: Storage, clock: FakeClock) -> AsyncIterator[EventStore]:
    """An EventStore over the test storage; PostgreSQL's event tables start empty."""
    if storage.backend.name == "postgresql":
        # conftest empties the limit tables only.
        with psycopg.connect(storage.backend.conninfo, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute("TRUNCATE events, event_resources")
    yield EventStore(storage.backend, clock)


def event(
    clock: FakeClock,
    name: str = "test.happened",
    rid: str = "r.1",
    *,
    at: float = 0.0,
    labels: dict[str, str] | None = None,
    related: list[dict[str, str]] | None = None,
    ident: str | None = None,
) -> EventRecord:
    """A client event ``at`` seconds from the clock's now."""
    return EventRecord(
        id=ident or str(uuid.uuid4()),
        occurred=clock() + at,
        event=name,
        resource={"prefect.resource.id": rid, **(labels or {})},
        related=related or [],
        payload={"n": 1},
        received=clock(),
    )


def everything(clock: FakeClock, **spec: Any) -> EventFilter:
    """A filter over the last day and the next one (clock time), plus ``spec``."""
    base = {
        "occurred": {
            "since": datetime.fromtimestamp(clock() - 86400, UTC).isoformat(),
            "until": datetime.fromtimestamp(clock() + 86400, UTC).isoformat(),
        }
    }
    return EventFilter.model_validate({**base, **spec})


async def related_rows(store: EventStore) -> int:
    row = await store.backend.run(lambda tx: tx.one("SELECT COUNT(*) FROM event_resources"))
    assert row is not None
    return int(row[0])


# --- ingest -----------------------------------------------------------------------------------------


async def test_ingest_stores_and_returns_new_events(store: EventStore, clock: FakeClock) -> None:
    a = event(clock, related=[{"prefect.resource.id": "t.1", "prefect.resource.role": "tag"}])
    b = event(clock, at=1)
    assert await store.ingest([a, b]) == [a, b]
    page, total = await store.query(everything(clock), 50)
    assert total == 2
    assert page == [b, a]  # newest first, records round-trip exactly
    assert await related_rows(store) == 1


async def test_duplicate_ids_are_stored_once(store: EventStore, clock: FakeClock) -> None:
    tag = [{"prefect.resource.id": "t.1", "prefect.resource.role": "tag"}]
    a = event(clock, related=tag)
    copy = event(clock, "other.name", related=tag, ident=a.id)
    assert await store.ingest([a, copy]) == [a]  # within one batch
    assert await store.ingest([copy]) == []  # and across batches
    page, total = await store.query(everything(clock), 50)
    assert (page, total) == ([a], 1)
    assert await related_rows(store) == 1


async def test_client_copies_of_slot_events_are_dropped(store: EventStore, clock: FakeClock) -> None:
    copies = [event(clock, name) for name in sorted(builders.SLOT_EVENTS)]
    other = event(clock, "prefect.concurrency-limit.created")
    assert await store.ingest([*copies, other]) == [other]
    assert store.dropped_slot_copies == len(builders.SLOT_EVENTS)
    page, total = await store.query(everything(clock), 50)
    assert (page, total) == ([other], 1)


async def test_the_server_slot_event_stays_the_only_one(
    store: EventStore, storage: Storage, clock: FakeClock
) -> None:
    await storage.create_limit(LimitSpec(name="db", limit=2))
    await storage.acquire(AcquireRequest(["db"], 1))
    only_acquired = everything(clock, event={"name": [builders.ACQUIRED]})
    (server,), _ = await store.query(only_acquired, 50)
    # Prefect's client sends its own copy, with its own id: acknowledged, not stored.
    copy = event(clock, builders.ACQUIRED, server.resource_id, labels=dict(server.resource))
    assert await store.ingest([copy]) == []
    page, total = await store.query(only_acquired, 50)
    assert (page, total) == ([server], 1)


async def test_unstorable_events_store_nothing(store: EventStore, clock: FakeClock) -> None:
    good = event(clock)
    bad = event(clock, "nul\x00name")
    with pytest.raises(ValueError, match="NUL"):
        await store.ingest([good, bad])
    assert (await store.query(everything(clock), 50))[1] == 0


def test_unstorable_reasons() -> None:
    def make(**fields: Any) -> EventRecord:
        base: dict[str, Any] = {
            "id": "1",
            "occurred": 0.0,
            "event": "e",
            "resource": {"prefect.resource.id": "r"},
        }
        return EventRecord(**{**base, **fields})

    assert unstorable(make()) is None
    assert "NUL" in (unstorable(make(resource={"prefect.resource.id": "r", "k\x00": "v"})) or "")
    related = [{"prefect.resource.id": "r\x00", "prefect.resource.role": "x"}]
    assert "NUL" in (unstorable(make(related=related)) or "")
    assert "JSON" in (unstorable(make(payload={"n": 2**70})) or "")
    assert "JSON" in (unstorable(make(payload={"s": "\ud800"})) or "")
    assert unstorable(make(payload={"nul": "\x00 is fine in the payload"})) is None


# --- query ------------------------------------------------------------------------------------------


async def test_query_orders_pages_and_counts(store: EventStore, clock: FakeClock) -> None:
    records = [event(clock, at=i // 2) for i in range(7)]  # pairs share an instant
    await store.ingest(records)
    newest_first = sorted(records, key=lambda r: (r.occurred, r.id), reverse=True)
    page, total = await store.query(everything(clock), 3, 0)
    assert (page, total) == (newest_first[:3], 7)
    page, total = await store.query(everything(clock), 3, 6)
    assert (page, total) == (newest_first[6:], 7)
    page, total = await store.query(everything(clock, order="ASC"), 50)
    assert page == newest_first[::-1]
    page, total = await store.query(everything(clock), 2, 1, with_total=False)
    assert (page, total) == (newest_first[1:3], -1)
    assert (await store.query(everything(clock), 0))[0] == []


async def test_query_applies_the_filter(store: EventStore, clock: FakeClock) -> None:
    tag = {"prefect.resource.id": "prefect.tag.db", "prefect.resource.role": "tag"}
    a = event(clock, "flow.started", "prefect.flow-run.1", related=[tag])
    b = event(clock, "flow.finished", "prefect.flow-run.2", labels={"prefect.resource.name": "nightly"})
    c = event(clock, "task.started", "prefect.task-run.1", at=-2 * 86400)  # outside the range
    await store.ingest([a, b, c])
    assert (await store.query(everything(clock, related={"role": ["tag"]}), 50))[0] == [a]
    labels = {"labels": {"prefect.resource.name": "night*"}}
    assert (await store.query(everything(clock, resource=labels), 50))[0] == [b]
    assert (await store.query(everything(clock, text={"query": "flow -finished"}), 50))[0] == [a]
    assert (await store.query(everything(clock), 50))[1] == 2


async def test_distinct_keeps_the_first_event_per_resource_in_order(
    store: EventStore, clock: FakeClock
) -> None:
    r1_old, r1_new = event(clock, rid="r.1", at=1), event(clock, rid="r.1", at=5)
    r2_old, r2_new = event(clock, rid="r.2", at=2), event(clock, rid="r.2", at=3)
    await store.ingest([r1_old, r1_new, r2_old, r2_new])
    distinct = {"distinct": True}
    page, total = await store.query(everything(clock, resource=distinct), 50)
    assert (page, total) == ([r1_new, r2_new], 2)
    page, total = await store.query(everything(clock, resource=distinct, order="ASC"), 50)
    assert (page, total) == ([r1_old, r2_old], 2)
    page, total = await store.query(everything(clock, resource=distinct), 1, 1)
    assert (page, total) == ([r2_new], 2)


# --- count-by ---------------------------------------------------------------------------------------


async def test_count_by_event_and_resource(store: EventStore, clock: FakeClock) -> None:
    await store.ingest(
        [
            event(clock, "b.event", "r.1", at=0, labels={"prefect.resource.name": "old name"}),
            event(clock, "b.event", "r.1", at=10, labels={"prefect.resource.name": "new name"}),
            event(clock, "a.event", "r.1", at=20, labels={"prefect.resource.name": "new name"}),
            event(clock, "a.event", "r.2", at=30, labels={"prefect.name": "legacy"}),
            event(clock, "c.event", "r.3", at=40),
        ]
    )
    start = clock()
    by_event = await store.count_by(Countable.event, everything(clock))
    assert [(c.value, c.label, c.count) for c in by_event] == [
        ("a.event", "a.event", 2),
        ("b.event", "b.event", 2),
        ("c.event", "c.event", 1),
    ]
    assert by_event[0].start_time.timestamp() == start + 20
    assert by_event[0].end_time.timestamp() == start + 30
    by_resource = await store.count_by(Countable.resource, everything(clock))
    assert [(c.value, c.label, c.count) for c in by_resource] == [
        ("r.1", "new name", 3),  # the latest label wins
        ("r.2", "legacy", 1),  # then prefect.name
        ("r.3", "r.3", 1),  # then the id
    ]


async def test_count_by_time_buckets_and_backfills(store: EventStore, clock: FakeClock) -> None:
    clock.now = PIVOT.timestamp() + 1000 * 86400 + 30 * 60  # 00:30 on a day boundary + 1000 days
    now = clock()
    await store.ingest([event(clock, at=-2 * HOUR), event(clock, at=-2 * HOUR + 1), event(clock, at=-1)])
    window = {"occurred": {"since": datetime.fromtimestamp(now - 3 * HOUR, UTC).isoformat()}}
    event_filter = with_defaults(EventFilter.model_validate(window), now)
    counts = await store.count_by(Countable.time, event_filter, TimeUnit.hour, 1.0)
    assert [(c.value, c.count) for c in counts] == [("0", 0), ("1", 2), ("2", 0), ("3", 1)]
    first = datetime.fromtimestamp(now - 3.5 * HOUR, UTC)  # the hour holding ``since``
    assert counts[0].label == first.isoformat() and counts[0].label.endswith("+00:00")
    assert counts[0].start_time == first
    assert counts[0].end_time == first + timedelta(hours=1, microseconds=-1)
    half_hours = await store.count_by(Countable.time, event_filter, TimeUnit.hour, 0.5)
    assert [c.count for c in half_hours] == [0, 0, 2, 0, 0, 1]
    days = await store.count_by(Countable.day, event_filter, TimeUnit.second, 0.01)  # unit ignored
    assert [(c.value, c.count) for c in days] == [("0", 2), ("1", 1)]
    assert days[1].label == datetime.fromtimestamp(now - 30 * 60, UTC).isoformat()


async def test_count_by_refuses_too_many_buckets(store: EventStore, clock: FakeClock) -> None:
    with pytest.raises(InvalidCountRequest, match="would create 2880 buckets"):
        await store.count_by(Countable.time, everything(clock), TimeUnit.minute, 1.0)
    with pytest.raises(InvalidCountRequest, match=r"minimum interval is 0\.01"):
        await store.count_by(Countable.event, everything(clock), TimeUnit.day, 0.001)


# --- retention --------------------------------------------------------------------------------------


async def test_delete_older_than_deletes_events_and_their_related_rows(
    store: EventStore, clock: FakeClock
) -> None:
    tag = [{"prefect.resource.id": "t.1", "prefect.resource.role": "tag"}]
    old = [event(clock, at=-100 - i, related=tag) for i in range(5)]
    new = [event(clock, at=0, related=tag), event(clock, at=5)]
    await store.ingest([*old, *new])
    assert await related_rows(store) == 6
    assert await store.delete_older_than(clock() - 50, batch=2) == 5  # three batches
    page, total = await store.query(everything(clock), 50)
    assert {r.id for r in page} == {r.id for r in new} and total == 2
    assert await related_rows(store) == 1  # ON DELETE CASCADE, on both backends
    assert await store.delete_older_than(clock() - 50) == 0


async def test_run_retention_deletes_in_the_background(store: EventStore, clock: FakeClock) -> None:
    await store.ingest([event(clock, at=-8 * 86400), event(clock)])
    task = asyncio.create_task(run_retention(store, 7 * 86400, 0.01))
    try:
        for _ in range(200):
            if (await store.query(EventFilter.model_validate({"occurred": ALL_TIME}), 50))[1] == 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("retention never ran")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- count-by arithmetic (pure) ---------------------------------------------------------------------


def test_end_of_period() -> None:
    moment = datetime(2026, 11, 25, 14, 7, 33, 120, tzinfo=UTC)  # a Wednesday
    assert end_of_period(moment, TimeUnit.second) == datetime(2026, 11, 25, 14, 7, 33, 999999, tzinfo=UTC)
    assert end_of_period(moment, TimeUnit.minute) == datetime(2026, 11, 25, 14, 7, 59, 999999, tzinfo=UTC)
    assert end_of_period(moment, TimeUnit.hour) == datetime(2026, 11, 25, 14, 59, 59, 999999, tzinfo=UTC)
    assert end_of_period(moment, TimeUnit.day) == datetime(2026, 11, 25, 23, 59, 59, 999999, tzinfo=UTC)
    assert end_of_period(moment, TimeUnit.week) == datetime(2026, 11, 29, 23, 59, 59, 999999, tzinfo=UTC)


def test_check_buckets_uses_prefects_rounding() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    check_buckets(since, since + timedelta(days=1000), TimeUnit.day, 1.0)
    with pytest.raises(InvalidCountRequest) as error:
        check_buckets(since, since + timedelta(days=1000, seconds=1), TimeUnit.day, 1.0)
    assert str(error.value) == (
        "The given interval would create 1001 buckets, which is too many. Please increase the "
        "interval or reduce the time range to produce 1000 buckets or fewer."
    )
    with pytest.raises(InvalidCountRequest, match="too large"):
        check_buckets(since, since, TimeUnit.week, 1e15)


def test_time_counts_in_the_future_end_with_the_current_period() -> None:
    now = PIVOT + timedelta(days=10, hours=5)
    counts = time_counts(now - timedelta(days=2), now + timedelta(days=30), TimeUnit.day, 1.0, now, {})
    assert [c.label for c in counts] == [
        (PIVOT + timedelta(days=d)).isoformat() for d in (8, 9, 10)
    ]  # Prefect stops at the end of today
    # ...but a counted future bucket still gets its row (Prefect would fail with an IndexError).
    counts = time_counts(now - timedelta(days=1), now + timedelta(days=30), TimeUnit.day, 1.0, now, {12: 4})
    assert [(c.value, c.count) for c in counts] == [("0", 0), ("1", 0), ("2", 0), ("3", 4)]


def test_labelled_counts_merge_and_order() -> None:
    rows = [
        ("r.1", "old", 2, 10.0, 20.0),
        ("r.1", "new", 1, 30.0, 40.0),
        ("r.2", "b", 3, 5.0, 6.0),
        ("r.3", "a", 3, 7.0, 8.0),
    ]
    counts = labelled_counts(rows)
    assert [(c.value, c.label, c.count) for c in counts] == [
        ("r.3", "a", 3),
        ("r.2", "b", 3),
        ("r.1", "new", 3),
    ]
    r1 = counts[2]
    assert (r1.start_time.timestamp(), r1.end_time.timestamp()) == (10.0, 40.0)
    assert r1.wire() == {
        "value": "r.1",
        "label": "new",
        "count": 3,
        "start_time": "1970-01-01T00:00:10.000000Z",
        "end_time": "1970-01-01T00:00:40.000000Z",
    }
