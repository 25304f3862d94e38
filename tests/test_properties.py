"""Property-based tests of the storage: random sequences of operations against a plain model.

A hypothesis state machine drives :class:`slotkeeper.storage.Storage` (on SQLite, and on
PostgreSQL in a database of its own) with a fake clock, and keeps beside it the simplest model of
what the server promises: each limit has a pool that decays, each lease has grants that count
until the lease expires. After every step it checks, for every limit:

* occupancy read from storage == decayed pool + slots of the live grants in the model;
* the live leases storage lists are exactly those of the model;
* an active limit is never over its ``limit`` because of an acquisition (only an update that
  lowered the limit may leave it over; ``active_slots`` above the limit is refused).

Every outcome (granted, 422, 423, 409, True/False of release, renew and the reaper count) is
predicted by the model first and compared with what storage did.

Clock steps, lease durations and decay rates are binary fractions (multiples of 0.25 s; rates
0.5, 1, 2 and 4 per second), so the model's arithmetic and the server's are exact and agree.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from slotkeeper.domain import Mode
from slotkeeper.errors import Conflict, InvalidRequest, SlotsUnavailable
from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
from slotkeeper.storage import Storage, open_storage
from tests.conftest import FakeClock, sqlite_copies, truncate_postgres

T = TypeVar("T")

NAMES = ["a", "b", "c", "d"]
UNKNOWN = "zz"
QUARTERS = st.integers(min_value=1, max_value=80).map(lambda k: k * 0.25)  # 0.25 s .. 20 s
RATES = st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 4.0])


@dataclass
class ModelLimit:
    """What the server promises about one limit."""

    id: str
    limit: int
    active: bool
    decay: float
    pool: int
    clock: float
    fencing: int = 0
    #: Set when an update (not an acquisition) may have put the limit over its ``limit``.
    over_allowed: bool = False

    def settle(self, now: float) -> None:
        """Leaky bucket: one slot leaves every 1/decay s, counted from when it came; an empty
        pool or a pool without decay keeps no progress."""
        if self.pool <= 0 or self.decay <= 0:
            self.pool, self.clock = max(self.pool, 0), now
            return
        if now <= self.clock:
            return
        gone = math.floor((now - self.clock) * self.decay)
        if gone >= self.pool:
            self.pool, self.clock = 0, now
        else:
            self.pool, self.clock = self.pool - gone, self.clock + gone / self.decay


@dataclass
class ModelLease:
    expires: float
    #: Slots held per limit id (0 on a limit that was inactive at acquisition).
    grants: dict[str, int] = field(default_factory=dict)


class StorageMachine(RuleBasedStateMachine):
    """Random operations on one storage, checked step by step against the model."""

    #: Set by each test before it runs the machine: returns a fresh, migrated, empty database URL.
    fresh_url: Any = None

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.url = type(self).fresh_url()
        self.storage: Storage = open_storage(self.url, pool_size=2)
        self.storage.clock = self.clock
        self.limits: dict[str, ModelLimit] = {}
        self.model_leases: dict[str, ModelLease] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.storage.close())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    # --- the model's view -----------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now

    def live_leased(self, limit_id: str) -> int:
        return sum(
            lease.grants.get(limit_id, 0) for lease in self.model_leases.values() if lease.expires > self.now
        )

    def occupancy(self, name: str) -> int:
        lim = self.limits[name]
        lim.settle(self.now)
        return lim.pool + self.live_leased(lim.id)

    # --- rules ----------------------------------------------------------------------------------

    def pick_limit(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.limits)), label="limit")

    def pick_names(self, data: st.DataObject) -> list[str]:
        """One to three names: mostly existing limits, sometimes repeated or unknown."""
        choices = [*sorted(self.limits), UNKNOWN]
        return data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3), label="names")

    @initialize(
        specs=st.lists(st.tuples(st.integers(1, 6), RATES), min_size=len(NAMES) - 2, max_size=len(NAMES) - 2)
    )
    def first_limits(self, specs: list[tuple[int, float]]) -> None:
        for name, (limit, decay) in zip(NAMES, specs, strict=False):
            self.create_limit(name, limit, True, decay, 0)

    def create_limit(self, name: str, limit: int, active: bool, decay: float, active_slots: int) -> None:
        spec = LimitSpec(name, limit, active, active_slots, 0, decay)
        if active_slots > limit or name in self.limits:
            with pytest.raises(InvalidRequest if active_slots > limit else Conflict):
                self.run(self.storage.create_limit(spec))
            return
        view = self.run(self.storage.create_limit(spec))
        self.limits[name] = ModelLimit(view.limit.id, limit, active, decay, active_slots, self.now)

    @rule(
        name=st.sampled_from(NAMES),
        limit=st.integers(0, 6),
        active=st.booleans(),
        decay=RATES,
        active_slots=st.integers(0, 3),
    )
    def create(self, name: str, limit: int, active: bool, decay: float, active_slots: int) -> None:
        self.create_limit(name, limit, active, decay, active_slots)

    def acquire(self, data: st.DataObject, duration: float | None, rate_limit: bool) -> Any:
        names = self.pick_names(data)
        slots = data.draw(st.integers(1, 3), label="slots")
        mode = Mode.RATE_LIMIT if rate_limit else Mode.CONCURRENCY
        lease = LeaseSpec(duration) if duration is not None else None
        found = [n for n in dict.fromkeys(names) if n in self.limits]
        active = [n for n in found if self.limits[n].active]
        request = AcquireRequest(names, slots, mode, lease)

        expected: type[Exception] | None = None
        too_many = any(self.limits[n].limit < slots for n in active)
        no_decay = rate_limit and any(self.limits[n].decay <= 0 for n in active)
        if too_many or no_decay:
            expected = InvalidRequest
        elif any(self.occupancy(n) + slots > self.limits[n].limit for n in active):
            expected = SlotsUnavailable
        if expected is not None:
            with pytest.raises(expected):
                self.run(self.storage.acquire(request))
            return multiple()

        granted = self.run(self.storage.acquire(request))
        assert [lim.name for lim in granted.limits] == found
        assert (granted.lease_id is None) == (lease is None)
        for name in found:
            lim = self.limits[name]
            lim.settle(self.now)
            lim.fencing += 1
            if lim.active and (lease is None or rate_limit):
                lim.pool += slots
        if found and lease is not None:
            grants = {} if rate_limit else {self.limits[n].id: slots if n in active else 0 for n in found}
            self.model_leases[granted.lease_id or ""] = ModelLease(self.now + lease.duration, grants)
        for name in active:
            # The heart of it: an acquisition never takes an active limit over its limit.
            assert self.run(self.storage.read_limit(name)).active_slots <= self.limits[name].limit
        return multiple(granted.lease_id) if granted.lease_id else multiple()

    @rule(target=leases, data=st.data(), duration=QUARTERS)
    def acquire_with_lease(self, data: st.DataObject, duration: float) -> Any:
        return self.acquire(data, duration, rate_limit=False)

    @rule(target=leases, data=st.data(), duration=QUARTERS)
    def acquire_with_lease_again(self, data: st.DataObject, duration: float) -> Any:
        return self.acquire(data, duration, rate_limit=False)  # twice the weight: the main path

    @rule(data=st.data())
    def acquire_without_lease(self, data: st.DataObject) -> None:
        self.acquire(data, None, rate_limit=False)

    @rule(target=leases, data=st.data(), duration=st.none() | QUARTERS)
    def acquire_rate_limited(self, data: st.DataObject, duration: float | None) -> Any:
        return self.acquire(data, duration, rate_limit=True)

    @precondition(lambda self: self.model_leases)
    @rule(data=st.data())
    def release_held_lease(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(list(self.model_leases)), label="lease")
        assert self.run(self.storage.release_lease(lease_id)) is True
        del self.model_leases[lease_id]

    @rule(lease_id=leases)
    def release_any_lease(self, lease_id: str) -> None:
        # Any lease ever granted: live, expired, reaped, released, or never stored.
        expected = lease_id in self.model_leases
        assert self.run(self.storage.release_lease(lease_id)) is expected
        self.model_leases.pop(lease_id, None)

    @rule(data=st.data())
    def plain_decrement(self, data: st.DataObject) -> None:
        names = self.pick_names(data)
        slots = data.draw(st.integers(1, 3), label="slots")
        found = [n for n in dict.fromkeys(names) if n in self.limits]
        result = self.run(self.storage.release_slots(names, slots, None))
        assert sorted(lim.name for lim in result) == sorted(found)
        for name in found:
            lim = self.limits[name]
            if lim.active:
                lim.settle(self.now)
                lim.pool = max(0, lim.pool - slots)

    def renew(self, lease_id: str, duration: float) -> None:
        lease = self.model_leases.get(lease_id)
        expected = lease is not None and lease.expires > self.now
        assert self.run(self.storage.renew_lease(lease_id, duration)) is expected
        if lease is not None and expected:
            lease.expires = self.now + duration

    @precondition(lambda self: self.model_leases)
    @rule(data=st.data(), duration=QUARTERS)
    def renew_held_lease(self, data: st.DataObject, duration: float) -> None:
        self.renew(data.draw(st.sampled_from(list(self.model_leases)), label="lease"), duration)

    @rule(lease_id=leases, duration=QUARTERS)
    def renew_any_lease(self, lease_id: str, duration: float) -> None:
        self.renew(lease_id, duration)

    @rule(seconds=QUARTERS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: any(lease.expires > self.now for lease in self.model_leases.values()))
    @rule()
    def advance_to_the_next_expiry(self) -> None:
        # Exactly onto the instant: the lease must stop counting there, not a moment later.
        self.clock.now = min(
            lease.expires for lease in self.model_leases.values() if lease.expires > self.now
        )

    @rule()
    def reap(self) -> None:
        expired = [i for i, lease in self.model_leases.items() if lease.expires <= self.now]
        assert self.run(self.storage.reap_expired()) == len(expired)
        for lease_id in expired:
            del self.model_leases[lease_id]
        assert self.run(self.storage.reap_expired()) == 0

    @precondition(lambda self: self.limits)
    @rule(
        data=st.data(),
        change=st.sampled_from(["limit", "active", "slot_decay_per_second", "active_slots"]),
        value=st.integers(0, 6),
        decay=RATES,
    )
    def update(self, data: st.DataObject, change: str, value: int, decay: float) -> None:
        name = self.pick_limit(data)
        lim = self.limits[name]
        if change == "active_slots":
            leased = self.live_leased(lim.id)
            if value > lim.limit or value < leased:
                with pytest.raises(InvalidRequest if value > lim.limit else Conflict):
                    self.run(self.storage.update_limit(name, {"active_slots": value}))
                return
            self.run(self.storage.update_limit(name, {"active_slots": value}))
            lim.pool, lim.clock = value - leased, self.now
            return
        new: Any = {"limit": value, "active": not lim.active, "slot_decay_per_second": decay}[change]
        self.run(self.storage.update_limit(name, {change: new}))
        lim.settle(self.now)  # decay up to now counts at the old rate
        if change == "limit":
            lim.limit, lim.over_allowed = new, True
        elif change == "active":
            lim.active = new
        else:
            lim.decay = new

    @precondition(lambda self: self.limits)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = self.pick_limit(data)
        self.run(self.storage.delete_limit(name))
        gone = self.limits.pop(name)
        for lease in self.model_leases.values():
            lease.grants.pop(gone.id, None)

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def storage_agrees_with_the_model(self) -> None:
        # One listing reads every limit's occupancy at once (the same rule as a single read).
        views = {v.limit.name: v for v in self.run(self.storage.list_limits(100, 0))}
        assert set(views) == set(self.limits)
        for name, lim in self.limits.items():
            view = views[name]
            expected = self.occupancy(name)
            assert view.active_slots == expected, (name, view.active_slots, expected)
            assert (view.limit.limit, view.limit.active) == (lim.limit, lim.active)
            assert view.limit.fencing_token == lim.fencing
            live = {
                lease_id: lease.grants[lim.id]
                for lease_id, lease in self.model_leases.items()
                if lease.expires > self.now and lim.id in lease.grants
            }
            infos = self.run(self.storage.list_leases(name))
            assert {i.lease_id: i.slots for i in infos} == live
            if expected <= lim.limit:
                lim.over_allowed = False
            elif lim.active:
                assert lim.over_allowed, f"{name} is over its limit without an update"


def _run(fresh_url: Any, examples: int, steps: int) -> None:
    machine = type("Machine", (StorageMachine,), {"fresh_url": staticmethod(fresh_url)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_storage_keeps_its_invariants_on_sqlite(tmp_path: Path) -> None:
    _run(sqlite_copies(tmp_path), examples=100, steps=40)


@pytest.mark.postgres
def test_storage_keeps_its_invariants_on_postgres(private_postgres_url: str) -> None:
    # A database of its own (tests/conftest.py), so other tests' truncations never meet this machine.
    def fresh() -> str:
        truncate_postgres(private_postgres_url)
        return private_postgres_url

    _run(fresh, examples=30, steps=30)
