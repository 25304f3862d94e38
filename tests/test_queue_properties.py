"""Property tests of the wait queue: ``domain.admit`` alone, then ``Storage`` with random waiters.

``domain.admit`` is pure: for random limits and queues, what it grants must fit, must be granted
in queue order on every limit, and must not leave the head of the queue waiting when it fits.

The storage property drives real waiting acquisitions (SQLite, and PostgreSQL in a database of
its own) with a fake clock: 2-4 limits, each full at first (one holder per limit); 1-8 waiters
arriving in a known order, each on a random subset of the limits with random slots and priority.
Then the holders, and each waiter once granted, are released one at a time in a random order,
each through this process or another one at random (both ways a waiter gets its grant).
Every waiter must eventually be granted (no deadlock), no limit is ever over its capacity, and on
every limit the grants (fencing tokens) follow the queue order ``(-priority, arrival)``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slotkeeper import domain
from slotkeeper.domain import Limit, Mode, RetryPolicy
from slotkeeper.models import AcquireRequest, Granted, LeaseSpec, LimitSpec
from slotkeeper.storage import Storage, migrate, open_storage
from tests.conftest import FakeClock, truncate_postgres

# --- domain.admit, pure -------------------------------------------------------------------------


def _limit(i: int, size: int, used: int, active: bool) -> Limit:
    return Limit(
        id=f"L{i}",
        name=f"l{i}",
        limit=size,
        active=active,
        pool_slots=0,
        pool_clock=0.0,
        leased_slots=used,
        slot_decay_per_second=0.0,
        denied_slots=0,
        avg_slot_occupancy_seconds=2.0,
        fencing_token=0,
        created=0.0,
        updated=0.0,
    )


@st.composite
def queues(draw: st.DrawFn) -> tuple[dict[str, Limit], list[domain.Waiter]]:
    count = draw(st.integers(1, 4))
    limits = {}
    for i in range(count):
        size = draw(st.integers(0, 4))
        limits[f"L{i}"] = _limit(i, size, draw(st.integers(0, size)), draw(st.booleans() | st.just(True)))
    waiters = []
    for w in range(draw(st.integers(0, 8))):
        names = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=count, unique=True))
        waiters.append(domain.Waiter(f"w{w}", tuple(names), draw(st.integers(1, 5)), 0, w))
    return limits, waiters


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(queues())
def test_admit_grants_what_fits_in_queue_order(case: tuple[dict[str, Limit], list[domain.Waiter]]) -> None:
    limits, waiters = case
    granted = domain.admit(waiters, limits, 0.0)
    chosen = {w.id for w in granted}
    assert [w.id for w in granted] == [w.id for w in waiters if w.id in chosen]  # queue order
    free = {i: lim.limit - lim.leased_slots for i, lim in limits.items() if lim.active}
    for w in granted:
        for i in w.limit_ids:
            if i in free:
                free[i] -= w.slots
    assert all(slots >= 0 for slots in free.values()), "over capacity"

    def fits_ever(w: domain.Waiter) -> bool:
        return all(limits[i].limit >= w.slots for i in w.limit_ids if limits[i].active)

    # Strict FIFO per limit: a waiter that could ever fit and was passed over blocks every later
    # waiter on its active limits.
    for k, waiter in enumerate(waiters):
        if waiter.id in chosen or not fits_ever(waiter):
            continue
        blocked = {i for i in waiter.limit_ids if limits[i].active}
        for later in waiters[k + 1 :]:
            if later.id in chosen:
                assert not blocked & {i for i in later.limit_ids if limits[i].active}, (waiter, later)
    # Progress: the first waiter that could ever fit is granted if its slots are free now.
    head = next((w for w in waiters if fits_ever(w)), None)
    if head is not None:
        room = {i: lim.limit - lim.leased_slots for i, lim in limits.items() if lim.active}
        if all(room[i] >= head.slots for i in head.limit_ids if i in room):
            assert head.id in chosen


# --- Storage, with real waiting acquisitions -------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    limits: tuple[int, ...]
    slots: int
    priority: int


@dataclass(frozen=True)
class Scenario:
    sizes: tuple[int, ...]
    waiters: tuple[Wanted, ...]
    seed: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    sizes = tuple(draw(st.lists(st.integers(1, 3), min_size=2, max_size=4)))
    waiters = []
    for _ in range(draw(st.integers(1, 8))):
        chosen = tuple(
            draw(st.lists(st.integers(0, len(sizes) - 1), min_size=1, max_size=len(sizes), unique=True))
        )
        slots = draw(st.integers(1, min(sizes[i] for i in chosen)))
        waiters.append(Wanted(chosen, slots, draw(st.sampled_from([0, 0, 0, 1, 5]))))
    return Scenario(sizes, tuple(waiters), draw(st.integers(0, 2**32)))


#: Iterations of 2 ms before a wait for the queue to settle gives up (a bound, not a timing).
PATIENCE_STEPS = 10_000


async def _rows(storage: Storage) -> tuple[int, int]:
    """(queued waiters, granted waiters not yet collected)."""
    rows = await storage.backend.run(lambda tx: tx.all("SELECT lease_id FROM waiters"))
    queued = sum(1 for (lease,) in rows if lease is None)
    return queued, len(rows) - queued


async def play(storage: Storage, clock: FakeClock, scenario: Scenario) -> None:
    names = [f"l{i}" for i in range(len(scenario.sizes))]
    for name, size in zip(names, scenario.sizes, strict=True):
        await storage.create_limit(LimitSpec(name=name, limit=size))
    held: list[tuple[str, dict[str, int]]] = []  # (lease id, slots per limit name)
    for name, size in zip(names, scenario.sizes, strict=True):
        granted = await storage.acquire(AcquireRequest([name], size, Mode.CONCURRENCY, LeaseSpec(600.0)))
        assert granted.lease_id is not None
        held.append((granted.lease_id, {name: size}))

    tasks: list[asyncio.Task[Granted]] = []
    for k, wanted in enumerate(scenario.waiters):
        clock.advance(1.0)  # arrival order is queue order within a priority
        request = AcquireRequest(
            [names[i] for i in wanted.limits],
            wanted.slots,
            Mode.CONCURRENCY,
            LeaseSpec(600.0),
            wait=3600.0,
            priority=wanted.priority,
        )
        tasks.append(asyncio.create_task(storage.acquire(request)))
        for _ in range(PATIENCE_STEPS):  # every limit is full: each one queues
            if (await _rows(storage))[0] == k + 1:
                break
            assert not tasks[-1].done(), "granted although every limit it names is full"
            await asyncio.sleep(0.002)
        else:
            pytest.fail("a waiter never queued")

    collected: set[int] = set()
    tokens: dict[int, dict[str, int]] = {}
    rng = random.Random(scenario.seed)
    # Each release goes through this process (the grant is handed over in memory) or, at random,
    # through another one on the same database (the waiter is woken and collects it from its row).
    other = Storage(storage.backend, clock=clock, retry_policy=storage.retry_policy)
    via = random.Random(scenario.seed + 1)
    while held:
        lease_id, _ = held.pop(rng.randrange(len(held)))
        assert await via.choice([storage, other]).release_lease(lease_id)
        # Settle: every waiter this release admitted has collected its grant.
        for _ in range(PATIENCE_STEPS):
            queued, uncollected = await _rows(storage)
            done = sum(1 for t in tasks if t.done())
            if uncollected == 0 and done == len(tasks) - queued:
                break
            await asyncio.sleep(0.002)
        else:
            pytest.fail("the queue never settled")
        for k, task in enumerate(tasks):
            if task.done() and k not in collected:
                collected.add(k)
                granted = task.result()
                assert granted.lease_id is not None
                wanted = scenario.waiters[k]
                assert sorted(lim.name for lim in granted.limits) == sorted(names[i] for i in wanted.limits)
                tokens[k] = {lim.name: lim.fencing_token for lim in granted.limits}
                held.append((granted.lease_id, {names[i]: wanted.slots for i in wanted.limits}))
        # Capacity: what storage reports, and what the live grants add up to.
        for name, size in zip(names, scenario.sizes, strict=True):
            assert (await storage.read_limit(name)).active_slots <= size, f"{name} over capacity"
            assert sum(slots.get(name, 0) for _, slots in held) <= size
    # Liveness: everyone was granted; nothing is left queued or held.
    assert len(collected) == len(tasks), "a waiter was never granted (deadlock)"
    assert await _rows(storage) == (0, 0)
    for name in names:
        assert (await storage.read_limit(name)).active_slots == 0
    # Per-limit order: the grants on each limit follow the queue order.
    for name in names:
        on_limit = [k for k in range(len(tasks)) if name in tokens[k]]
        by_queue = sorted(on_limit, key=lambda k: (-scenario.waiters[k].priority, k))
        by_grant = sorted(on_limit, key=lambda k: tokens[k][name])
        assert by_grant == by_queue, (name, by_queue, by_grant)


def _check(fresh_url: Callable[[], str], examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(scenarios())
    def check(scenario: Scenario) -> None:
        clock = FakeClock()
        storage = open_storage(fresh_url(), retry_policy=RetryPolicy(rng=random.Random(7)))
        storage.clock = clock

        async def run() -> None:
            try:
                await play(storage, clock, scenario)
            finally:
                await storage.close()

        asyncio.run(run())

    check()


def test_every_waiter_is_served_fairly_and_without_deadlock_on_sqlite(tmp_path: Path) -> None:
    template = tmp_path / "template.db"
    migrate(f"sqlite:///{template}")
    count = iter(range(1_000_000))

    def fresh() -> str:
        path = tmp_path / f"example-{next(count)}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    _check(fresh, examples=60)


@pytest.mark.postgres
def test_every_waiter_is_served_fairly_and_without_deadlock_on_postgres(private_postgres_url: str) -> None:
    def fresh() -> str:
        truncate_postgres(private_postgres_url)
        return private_postgres_url

    _check(fresh, examples=25)
