"""Operator views and actions in storage, on SQLite and PostgreSQL (``storage`` fixture, fake clock):
the overview of limits (leased, pool as it decays, waiters), one limit's holders and queue in
order, grant statistics with exact wait percentiles, the wait time carried by acquired events, and
an operator ending a lease (``Storage.release_lease`` with ``cause=builders.OPERATOR``), released like any other end.
"""

from __future__ import annotations

import pytest

from slotkeeper.domain import Mode
from slotkeeper.errors import NotFound
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import AcquireRequest, Holder, LeaseSpec, LimitSpec
from slotkeeper.storage import Storage
from slotkeeper.storage.views import ViewStore
from tests.conftest import FakeClock, take
from tests.test_queue import arrive, hold, make, settle, wanting

HOLDER = Holder("task_run", "0b6b2f4e-8c0a-4a55-9b5c-3a8c1c2f8f10")


def views(storage: Storage) -> ViewStore:
    return ViewStore(storage.backend, storage.clock)


async def events_named(storage: Storage, name: str) -> list[EventRecord]:
    rows = await storage.backend.run(
        lambda tx: tx.all(
            "SELECT id, occurred, received, event, resource, related, payload, follows FROM events "
            "WHERE event = :name ORDER BY occurred, id",
            {"name": name},
        )
    )
    return [EventRecord.from_row(r) for r in rows]


# --- overview ------------------------------------------------------------------------------------


async def test_the_overview_counts_leased_pool_and_waiters(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 3)
    await make(storage, "rl", 10, slot_decay_per_second=0.5)
    await make(storage, "idle", 1, active=False)
    await hold(storage, "db", slots=2)
    await take(storage, "db", lease=None)  # one unleased slot: the pool
    await take(storage, "rl", slots=4, lease=None, mode=Mode.RATE_LIMIT)
    waiting = await arrive(storage, clock, wanting("db", slots=2))

    page, total, now = await views(storage).overview(10, 0)
    by_name = {s.limit.name: s for s in page}
    assert [s.limit.name for s in page] == ["db", "idle", "rl"]
    assert total == 3
    assert now == clock.now
    db = by_name["db"]
    assert (db.limit.leased_slots, db.limit.settled(now).pool_slots, db.waiters, db.waiting_slots) == (
        2,
        1,
        1,
        2,
    )
    assert by_name["idle"].limit.active is False
    assert (by_name["idle"].waiters, by_name["idle"].limit.leased_slots) == (0, 0)

    # The pool of a rate limit is shown as it decays: 0.5 slot per second, whole slots.
    clock.advance(3.0)
    page, _, now = await views(storage).overview(10, 0)
    rl = next(s for s in page if s.limit.name == "rl")
    assert rl.limit.settled(now).pool_slots == 4 - 1
    waiting.cancel()


async def test_the_overview_pages_and_filters_by_prefix(storage: Storage) -> None:
    for name in ["a-1", "a-2", "a-3", "b-1", "tag:x"]:
        await make(storage, name)
    first, total, _ = await views(storage).overview(2, 0)
    second, _, _ = await views(storage).overview(2, 2)
    assert ([s.limit.name for s in first], [s.limit.name for s in second], total) == (
        ["a-1", "a-2"],
        ["a-3", "b-1"],
        5,
    )
    tagged, total, _ = await views(storage).overview(10, 0, "tag:")
    assert ([s.limit.name for s in tagged], total) == (["tag:x"], 1)
    beyond, total, _ = await views(storage).overview(10, 50, "a-")
    assert (beyond, total) == ([], 3)


# --- one limit: holders and queue -------------------------------------------------------------------


async def test_a_limits_state_lists_holders_and_its_queue_in_order(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 2)
    await make(storage, "other", 5)
    first = await take(storage, "db", holder=HOLDER)
    clock.advance(1.0)
    second = await take(storage, "db")
    late = await arrive(storage, clock, wanting("db"))
    both = await arrive(storage, clock, wanting("db", "other", slots=2))
    urgent = await arrive(storage, clock, wanting("db", priority=5))

    state = await views(storage).state("db", 10)
    assert [h.lease_id for h in state.holders] == [first.lease_id, second.lease_id]
    assert (state.holders[0].holder, state.holders[0].slots, state.holders[0].fencing_token) == (HOLDER, 1, 1)
    assert state.summary.limit.leased_slots == 2
    assert [(w.position, w.priority, w.slots, w.limits) for w in state.queue] == [
        (1, 5, 1, 1),
        (2, 0, 1, 1),
        (3, 0, 2, 2),
    ]
    assert state.queue[1].enqueued < state.queue[2].enqueued
    assert (state.summary.waiters, state.summary.waiting_slots) == (3, 4)
    # Listed by id too, and only the head of a long queue when asked.
    head = await views(storage).state(state.summary.limit.id, 1)
    assert [w.priority for w in head.queue] == [5]
    assert head.summary.waiters == 3
    for task in (late, both, urgent):
        task.cancel()


async def test_a_state_of_no_such_limit_is_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await views(storage).state("nothing", 10)
    with pytest.raises(NotFound):
        await views(storage).grant_stats("nothing", 3600, 60)


async def test_expired_leases_are_not_holders(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 2)
    await take(storage, "db", lease=60)
    clock.advance(61)
    state = await views(storage).state("db", 10)
    assert (state.holders, state.summary.limit.leased_slots) == ([], 0)


# --- wait times and statistics ------------------------------------------------------------------------


async def test_a_grant_from_the_queue_says_how_long_it_waited(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db")
    lease = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db"))
    clock.advance(2.5)
    await storage.release_lease(lease)
    await settle(task)
    acquired = await events_named(storage, builders.ACQUIRED)
    assert [e.payload for e in acquired] == [{}, {"waited_seconds": pytest.approx(2.5, abs=1e-3)}]


async def test_grant_stats_count_grants_and_rank_waits_per_bucket(storage: Storage, clock: FakeClock) -> None:
    clock.now = 1_800_000_000.0  # a multiple of 60: buckets start on it
    await make(storage, "db")
    # First minute: three immediate grants (waited 0 s).
    for _ in range(3):
        await storage.release_lease(await hold(storage, "db"))
    # Second minute: a holder and three grants from the queue, after 1, 2 and 4 s of wait.
    clock.now = 1_800_000_060.0
    holding = await hold(storage, "db")
    for waited in (1.0, 2.0, 4.0):
        task = await arrive(storage, clock, wanting("db"))
        clock.advance(waited)
        await storage.release_lease(holding)
        holding = (await settle(task)).lease_id or ""
    clock.now = 1_800_000_150.0  # the third minute is half past

    limit_id, buckets = await views(storage).grant_stats("db", 180, 60)
    assert limit_id == (await storage.read_limit("db")).limit.id
    assert [(b.start, b.seconds, b.grants) for b in buckets] == [
        (1_800_000_000.0, 60.0, 3),
        (1_800_000_060.0, 60.0, 4),
        (1_800_000_120.0, 30.0, 0),
    ]
    assert (buckets[0].wait_p50, buckets[0].wait_max) == (0.0, 0.0)
    # Four grants, waits 0, 1, 2, 4 (+ the arrival ticks): nearest ranks 2, 4, 4 and the max.
    second = buckets[1]
    assert second.wait_p50 == pytest.approx(1.0, abs=0.01)
    assert second.wait_p90 == second.wait_p99 == second.wait_max == pytest.approx(4.0, abs=0.01)
    assert buckets[2].wait_p50 is None


async def test_grant_stats_count_tag_holds_too(storage: Storage, clock: FakeClock) -> None:
    from slotkeeper.storage.tags import TagStore

    clock.now = 1_800_000_000.0
    await storage.create_limit(LimitSpec("tag:etl", 2))
    tags = TagStore(storage)
    await tags.acquire(["etl"], "task-run-1")
    await take(storage, "tag:etl")
    _, buckets = await views(storage).grant_stats("tag:etl", 60, 60)
    assert [b.grants for b in buckets] == [2]


# --- an operator ends a lease -------------------------------------------------------------------------


async def test_an_operator_ends_a_lease_like_any_other_end(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db")
    await make(storage, "cache", 2)
    granted = await storage.acquire(
        AcquireRequest(["db", "cache"], 1, Mode.CONCURRENCY, LeaseSpec(60, HOLDER))
    )
    assert granted.lease_id is not None
    waiting = await arrive(storage, clock, wanting("db"))

    assert await storage.release_lease(granted.lease_id, cause=builders.OPERATOR) is True
    # The queue moves on in the same transaction.
    next_holder = await settle(waiting)
    assert [lim.name for lim in next_holder.limits] == ["db"]
    released = await events_named(storage, builders.RELEASED)
    acquired: dict[str, EventRecord] = {}  # the first of each limit: the revoked lease's
    for event in await events_named(storage, builders.ACQUIRED):
        acquired.setdefault(event.resource["prefect.resource.name"], event)
    assert sorted(e.resource["prefect.resource.name"] for e in released) == ["cache", "db"]
    for event in released:
        assert event.payload == {"reason": "operator"}
        assert event.follows == acquired[event.resource["prefect.resource.name"]].id
        assert builders.holder_resource(HOLDER) in event.related
    # Its holder can neither renew it nor end it again.
    assert await storage.renew_lease(granted.lease_id, 60) is False
    assert await storage.release_lease(granted.lease_id, cause=builders.OPERATOR) is False
    assert (await storage.read_limit("cache")).active_slots == 0


async def test_an_operator_ends_a_tag_hold_with_its_v1_event(storage: Storage) -> None:
    from slotkeeper.storage.tags import TagStore

    await storage.create_limit(LimitSpec("tag:etl", 1))
    await TagStore(storage).acquire(["etl"], "task-run-1")
    (lease,) = await storage.list_leases("tag:etl")
    assert await storage.release_lease(lease.lease_id, cause=builders.OPERATOR) is True
    (released,) = await events_named(storage, builders.V1_RELEASED)
    assert (released.payload, released.resource["task_run_id"]) == ({"reason": "operator"}, "task-run-1")
    assert (await storage.read_limit("tag:etl")).active_slots == 0
