"""Unit tests of :mod:`slotkeeper.domain`: the pure rules, no storage, no clock, no I/O."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from typing import Any

import pytest

from slotkeeper import domain
from slotkeeper.domain import (
    MIN_RETRY_AFTER_SECONDS,
    Limit,
    Mode,
    RetryPolicy,
    Waiter,
    admit,
    check_request,
    decay_pool,
    decide_acquire,
    looks_like_uuid,
    next_avg_occupancy,
    queue_order,
    release_pool,
    set_active_slots,
)
from slotkeeper.errors import Conflict, InvalidRequest, SlotsUnavailable

NOW = 1_000.0
#: Prefect's jitter bounds: a hint is drawn in [JITTER_LOW, 1.3] times its average.
JITTER_LOW = math.log2(2**1.3 / (2**1.3 - 1))
SLOTS_TOO_MANY = "Slots requested is greater than the limit"
NO_DECAY = (
    "Only concurrency limits with slot decay can be used for rate limiting. "
    "The following limits do not have a decay configured: "
)


def make_limit(name: str = "db", **fields: Any) -> Limit:
    """A limit with an empty pool, no leases, no decay, limit 5, unless told otherwise."""
    values: dict[str, Any] = {
        "id": f"id-{name}",
        "name": name,
        "limit": 5,
        "active": True,
        "pool_slots": 0,
        "pool_clock": NOW,
        "leased_slots": 0,
        "slot_decay_per_second": 0.0,
        "denied_slots": 0,
        "avg_slot_occupancy_seconds": domain.DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS,
        "fencing_token": 0,
        "created": NOW,
        "updated": NOW,
    }
    values.update(fields)
    return Limit(**values)


class FixedJitter(random.Random):
    """An rng whose jitter multiplier is exactly ``multiplier`` (it must lie in [0.7518, 1.3])."""

    def __init__(self, multiplier: float) -> None:
        super().__init__(0)
        self.multiplier = multiplier

    def uniform(self, a: float, b: float) -> float:
        value = math.exp(-self.multiplier)
        assert min(a, b) <= value <= max(a, b), "multiplier outside the jitter bounds"
        return value


def policy(multiplier: float = 1.0, **kwargs: Any) -> RetryPolicy:
    return RetryPolicy(rng=FixedJitter(multiplier), **kwargs)


def acquire(
    limits: list[Limit], slots: int = 1, mode: Mode = Mode.CONCURRENCY, *, leased: bool = True
) -> domain.Acquisition:
    return decide_acquire(limits, slots, mode, leased=leased, now=NOW, retry_after=policy())


# --- decay_pool -----------------------------------------------------------------------------------


def test_decay_removes_whole_slots_and_keeps_the_fraction() -> None:
    # 1.2 slots have decayed: one leaves, and the clock moves by the 2.5 s that one slot took.
    assert decay_pool(10, 0.0, 0.4, 3.0) == (9, 2.5)
    # The kept 0.5 s count towards the next slot: at t=5, 2.5 s since the clock = 1 more slot.
    assert decay_pool(9, 2.5, 0.4, 5.0) == (8, 5.0)


def test_decay_read_often_loses_nothing() -> None:
    # Read every 0.125 s for 2 s at 4 slots/s: exactly 8 slots leave, as if read once.
    pool, clock = 20, 0.0
    now = 0.0
    for _ in range(16):
        now += 0.125
        pool, clock = decay_pool(pool, clock, 4.0, now)
    assert pool == 12
    assert decay_pool(20, 0.0, 4.0, 2.0)[0] == 12


def test_decay_of_ten_per_second_gives_ten_per_second_whatever_the_read_rate() -> None:
    pool, clock = 100, 0.0
    for step in range(1, 21):  # read every 50 ms for 1 s
        pool, clock = decay_pool(pool, clock, 10.0, step * 0.05 + 1e-9)
    assert pool == 90


def test_decay_below_one_slot_changes_nothing() -> None:
    assert decay_pool(3, 0.0, 0.5, 1.999) == (3, 0.0)


def test_decay_empties_the_pool_and_resets_its_clock() -> None:
    assert decay_pool(3, 0.0, 1.0, 10.0) == (0, 10.0)
    assert decay_pool(3, 0.0, 1.0, 3.0) == (0, 3.0)


def test_empty_pool_does_not_bank_decay() -> None:
    # An empty pool's clock is "now": slots added later start decaying from when they came.
    pool, clock = decay_pool(0, 0.0, 1.0, 100.0)
    assert (pool, clock) == (0, 100.0)
    assert decay_pool(5, clock, 1.0, 100.9) == (5, 100.0)
    assert decay_pool(5, clock, 1.0, 101.0) == (4, 101.0)
    assert decay_pool(-2, 0.0, 1.0, 7.0) == (0, 7.0)


def test_decay_without_rate_or_without_time_changes_nothing() -> None:
    assert decay_pool(4, 0.0, 0.0, 1e6)[0] == 4
    assert decay_pool(4, 10.0, 1.0, 10.0) == (4, 10.0)
    assert decay_pool(4, 10.0, 1.0, 5.0) == (4, 10.0)  # a clock behind the pool never adds slots


def test_enabling_decay_later_does_not_decay_the_past() -> None:
    # A pool without decay has no progress to keep: its clock is "now", so a rate set later
    # only counts from then on.
    pool, clock = decay_pool(10, 0.0, 0.0, 500.0)
    assert (pool, clock) == (10, 500.0)
    assert decay_pool(pool, clock, 1.0, 502.0) == (8, 502.0)


def test_limit_settled_and_occupied() -> None:
    lim = make_limit(pool_slots=6, pool_clock=NOW, slot_decay_per_second=2.0, leased_slots=3)
    settled = lim.settled(NOW + 1.25)
    assert (settled.pool_slots, settled.pool_clock) == (4, NOW + 1.0)
    assert settled.leased_slots == 3
    assert lim.occupied(NOW + 1.25) == 7
    assert lim.occupied(NOW + 100) == 3  # leased slots never decay
    assert lim.pool_slots == 6  # frozen: settling returns a copy


# --- decide_acquire -------------------------------------------------------------------------------


def test_acquire_with_lease_writes_grants_not_the_pool() -> None:
    lim = make_limit(pool_slots=1, leased_slots=1, fencing_token=41)
    decision = acquire([lim], slots=3)
    assert decision.grant_slots == {lim.id: 3}
    [written] = decision.limits
    assert written.pool_slots == 1
    assert written.fencing_token == 42


def test_acquire_without_lease_goes_to_the_pool() -> None:
    lim = make_limit(pool_slots=1)
    decision = acquire([lim], slots=2, leased=False)
    assert decision.grant_slots == {}
    assert decision.limits[0].pool_slots == 3
    assert decision.limits[0].fencing_token == 1


def test_rate_limit_slots_go_to_the_pool_even_with_a_lease() -> None:
    lim = make_limit(slot_decay_per_second=1.0)
    decision = acquire([lim], slots=2, mode=Mode.RATE_LIMIT, leased=True)
    assert decision.grant_slots == {}
    assert decision.limits[0].pool_slots == 2


def test_acquire_up_to_exactly_the_limit() -> None:
    lim = make_limit(limit=5, pool_slots=2, leased_slots=1)
    assert acquire([lim], slots=2).grant_slots == {lim.id: 2}
    with pytest.raises(SlotsUnavailable) as info:
        acquire([lim], slots=3)
    assert info.value.retry_after is not None and info.value.retry_after > 0


def test_acquire_counts_the_decayed_pool() -> None:
    full = make_limit(limit=5, pool_slots=5, pool_clock=NOW - 1.0, slot_decay_per_second=1.0)
    decision = acquire([full], slots=1, leased=False)
    written = decision.limits[0]
    assert written.pool_slots == 5  # 4 left after decay, plus the 1 taken
    assert written.pool_clock == NOW


def test_acquire_is_all_or_nothing() -> None:
    free = make_limit("free", limit=10)
    full = make_limit("full", limit=2, leased_slots=2)
    with pytest.raises(SlotsUnavailable):
        acquire([free, full])
    with pytest.raises(SlotsUnavailable):
        acquire([full, free], leased=False)


def test_acquire_of_several_limits_grants_each() -> None:
    a, b = make_limit("a"), make_limit("b", pool_slots=2)
    decision = acquire([a, b], slots=2)
    assert decision.grant_slots == {a.id: 2, b.id: 2}
    assert [lim.name for lim in decision.limits] == ["a", "b"]
    assert [lim.fencing_token for lim in decision.limits] == [1, 1]


def test_acquire_of_nothing_grants_nothing() -> None:
    decision = acquire([], slots=3)
    assert decision.limits == []
    assert decision.grant_slots == {}


def test_inactive_limits_are_carried_but_not_counted() -> None:
    asleep = make_limit("asleep", active=False, limit=1, pool_slots=7)
    awake = make_limit("awake", limit=5)
    decision = acquire([asleep, awake], slots=3)
    assert [lim.name for lim in decision.limits] == ["asleep", "awake"]
    assert decision.grant_slots == {asleep.id: 0, awake.id: 3}
    assert decision.limits[0].pool_slots == 7
    # Without a lease nothing is added to the inactive pool either.
    decision = acquire([asleep, awake], slots=3, leased=False)
    assert [lim.pool_slots for lim in decision.limits] == [7, 3]


def test_inactive_limits_are_exempt_from_both_422_checks() -> None:
    asleep = make_limit("asleep", active=False, limit=0)
    decision = acquire([asleep], slots=4, mode=Mode.RATE_LIMIT)
    assert decision.limits[0].pool_slots == 0


def test_slots_above_the_limit_is_422() -> None:
    with pytest.raises(InvalidRequest) as info:
        acquire([make_limit(limit=2)], slots=3)
    assert info.value.detail == SLOTS_TOO_MANY


def test_a_limit_of_zero_refuses_every_request_as_invalid() -> None:
    with pytest.raises(InvalidRequest) as info:
        acquire([make_limit(limit=0)], slots=1)
    assert info.value.detail == SLOTS_TOO_MANY


def test_rate_limit_without_decay_is_422_naming_the_limits() -> None:
    limits = [
        make_limit("a"),
        make_limit("b", slot_decay_per_second=1.0),
        make_limit("c"),
        make_limit("d", active=False),
    ]
    with pytest.raises(InvalidRequest) as info:
        acquire(limits, mode=Mode.RATE_LIMIT)
    assert info.value.detail == NO_DECAY + "'a,c'"


def test_slots_above_the_limit_is_checked_before_missing_decay() -> None:
    with pytest.raises(InvalidRequest) as info:
        acquire([make_limit("a", limit=1), make_limit("b", limit=9)], slots=2, mode=Mode.RATE_LIMIT)
    assert info.value.detail == SLOTS_TOO_MANY


def test_invalid_requests_are_refused_before_full_limits() -> None:
    full_and_small = make_limit(limit=1, leased_slots=1)
    with pytest.raises(InvalidRequest):
        acquire([full_and_small], slots=2)
    with pytest.raises(InvalidRequest):
        acquire([full_and_small], mode=Mode.RATE_LIMIT)


def test_check_request_lets_through_what_can_succeed_some_day() -> None:
    full = make_limit(limit=2, leased_slots=2, slot_decay_per_second=1.0)
    check_request([full], 2, Mode.RATE_LIMIT)  # full now, but it decays: not refused
    check_request([], 9, Mode.RATE_LIMIT)
    check_request([make_limit(limit=0, active=False)], 9, Mode.RATE_LIMIT)


def test_check_request_refuses_in_prefects_order() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_request([make_limit("a", limit=1)], 2, Mode.RATE_LIMIT)
    assert info.value.detail == SLOTS_TOO_MANY
    with pytest.raises(InvalidRequest) as info:
        check_request([make_limit("a"), make_limit("b")], 1, Mode.RATE_LIMIT)
    assert info.value.detail == NO_DECAY + "'a,b'"


# --- admit (the server-side wait queue) -----------------------------------------------------------


_arrivals = itertools.count(1)


def waiter(name: str, *limits: Limit, slots: int = 1, priority: int = 0) -> Waiter:
    """A waiter arriving after every waiter made before it."""
    limit_ids = tuple(lim.id for lim in limits)
    return Waiter(id=name, limit_ids=limit_ids, slots=slots, priority=priority, sequence=next(_arrivals))


def by_id(*limits: Limit) -> dict[str, Limit]:
    return {lim.id: lim for lim in limits}


def test_admit_grants_in_order_while_slots_last() -> None:
    a = make_limit("a", limit=3)
    w1, w2, w3 = waiter("w1", a), waiter("w2", a, slots=2), waiter("w3", a)
    assert admit([w1, w2, w3], by_id(a), NOW) == [w1, w2]


def test_admit_serves_priority_then_arrival_whatever_order_it_is_given() -> None:
    # Arrival order, then ids that sort against it: only the arrival sequence breaks a tie.
    a = make_limit("a", limit=2)
    early, late, urgent = waiter("z", a), waiter("y", a), waiter("x", a, priority=1)
    assert admit([late, urgent, early], by_id(a), NOW) == [urgent, early]
    assert admit([late, early], by_id(a), NOW) == [early, late]
    assert sorted([late, early, urgent], key=queue_order) == [urgent, early, late]


def test_admit_is_fifo_without_barging() -> None:
    # w1 takes one of the 2 free slots; w2 wants 2 and must wait; w3 must not take the slot w2
    # is waiting for.
    a = make_limit("a", limit=2)
    w1, w2, w3 = waiter("w1", a), waiter("w2", a, slots=2), waiter("w3", a)
    assert admit([w1, w2, w3], by_id(a), NOW) == [w1]


def test_admit_is_all_or_nothing_across_limits() -> None:
    a = make_limit("a", limit=1)
    b = make_limit("b", limit=1, leased_slots=1)
    c = make_limit("c", limit=1)
    both, only_a, only_c = waiter("both", a, b), waiter("only_a", a), waiter("only_c", c)
    # "both" cannot have b, so it takes nothing, and blocks a for those behind it; c is apart.
    assert admit([both, only_a, only_c], by_id(a, b, c), NOW) == [only_c]


def test_admit_skips_a_waiter_that_can_never_fit() -> None:
    a = make_limit("a", limit=2)
    too_big, small = waiter("too_big", a, slots=3), waiter("small", a)
    assert admit([too_big, small], by_id(a), NOW) == [small]


def test_admit_ignores_inactive_and_missing_limits() -> None:
    asleep = make_limit("asleep", active=False, limit=1, pool_slots=1)
    gone = make_limit("gone")
    w = waiter("w", asleep, gone)
    assert admit([w], by_id(asleep), NOW) == [w]


def test_admit_counts_decay_up_to_now() -> None:
    a = make_limit("a", limit=2, pool_slots=2, pool_clock=NOW - 1.0, slot_decay_per_second=1.0)
    w1, w2 = waiter("w1", a), waiter("w2", a)
    assert admit([w1, w2], by_id(a), NOW) == [w1]
    assert admit([w1, w2], by_id(a), NOW + 1.0) == [w1, w2]


def test_admit_of_nobody_is_nobody() -> None:
    assert admit([], by_id(make_limit()), NOW) == []


# --- release_pool ---------------------------------------------------------------------------------


def test_release_pool_takes_from_the_pool() -> None:
    released = release_pool(make_limit(pool_slots=4, leased_slots=2), 3, NOW)
    assert released.pool_slots == 1
    assert released.leased_slots == 2


def test_release_pool_clamps_at_zero_and_leaves_leases_alone() -> None:
    released = release_pool(make_limit(pool_slots=2, leased_slots=3), 5, NOW)
    assert released.pool_slots == 0
    assert released.leased_slots == 3
    assert released.occupied(NOW) == 3


def test_release_pool_applies_decay_first() -> None:
    lim = make_limit(pool_slots=5, pool_clock=NOW - 2.5, slot_decay_per_second=1.0)
    released = release_pool(lim, 1, NOW)
    assert (released.pool_slots, released.pool_clock) == (2, NOW - 0.5)


# --- next_avg_occupancy ---------------------------------------------------------------------------


def test_avg_occupancy_moves_like_prefect() -> None:
    # Prefect's observed value: limit 1, avg 2.0, one 10 s sample of one slot → 6.0.
    assert next_avg_occupancy(2.0, 10.0, 1, 1) == pytest.approx(6.0)
    # Limit 5: the window spans 10 samples; 2 slots for 8 s is 4 s per slot.
    assert next_avg_occupancy(2.0, 8.0, 2, 5) == pytest.approx(2.0 + 4.0 / 10 - 2.0 / 10)


def test_avg_occupancy_sample_has_a_floor_per_slot() -> None:
    assert next_avg_occupancy(0.1, 0.001, 1, 3) == pytest.approx(0.1)
    assert next_avg_occupancy(1.0, 0.0, 4, 1) == pytest.approx(1.0 + 0.1 / 2 - 1.0 / 2)


def test_avg_occupancy_with_limit_zero_is_one_sample_window() -> None:
    value = next_avg_occupancy(2.0, 7.0, 1, 0)
    assert math.isfinite(value)
    assert value == pytest.approx(7.0)


def test_avg_occupancy_with_zero_slots_counts_one() -> None:
    assert next_avg_occupancy(2.0, 4.0, 0, 1) == pytest.approx(2.0 + 4.0 / 2 - 2.0 / 2)


# --- set_active_slots -----------------------------------------------------------------------------


def test_set_active_slots_puts_the_unleased_part_in_the_pool() -> None:
    lim = make_limit(pool_slots=9, pool_clock=NOW - 50, leased_slots=2, slot_decay_per_second=1.0)
    updated = set_active_slots(lim, 5, NOW)
    assert (updated.pool_slots, updated.pool_clock) == (3, NOW)
    assert updated.occupied(NOW) == 5


def test_set_active_slots_to_exactly_the_leased_slots_empties_the_pool() -> None:
    updated = set_active_slots(make_limit(pool_slots=4, leased_slots=2), 2, NOW)
    assert updated.pool_slots == 0
    assert updated.occupied(NOW) == 2


def test_set_active_slots_below_live_leases_is_a_conflict() -> None:
    with pytest.raises(Conflict) as info:
        set_active_slots(make_limit(leased_slots=3), 2, NOW)
    assert "live leases hold 3 slot(s)" in info.value.detail


def test_set_active_slots_may_not_exceed_the_limit() -> None:
    with pytest.raises(InvalidRequest) as info:
        set_active_slots(make_limit(limit=2), 7, NOW)
    assert (info.value.detail, info.value.code) == (
        "active_slots cannot be set to 7: the limit is 2",
        "active_slots_above_limit",
    )
    assert set_active_slots(make_limit(limit=2), 2, NOW).occupied(NOW) == 2


# --- RetryPolicy ----------------------------------------------------------------------------------


def test_retry_estimate_is_half_the_average_scaled_by_the_share_asked() -> None:
    # Prefect's worked example (limit 2, avg 2.0, no decay) gives 1.0 before jitter; what is left
    # of a hold on average is half of it: 0.5.
    lim = make_limit(limit=2, leased_slots=2)
    assert policy().seconds([lim], 1, NOW) == pytest.approx(0.5)
    # Denied slots count in the share: avg 2.0, limit 10, denied 10 → 2.0 / 2 * 11 / 10.
    lim = make_limit(limit=10, leased_slots=10, denied_slots=10)
    assert policy().seconds([lim], 1, NOW) == pytest.approx(1.1)


def test_retry_is_capped_at_max_wait() -> None:
    lim = make_limit("db", limit=1, leased_slots=1, avg_slot_occupancy_seconds=10_800.0)
    assert policy(max_wait=30.0).seconds([lim], 1, NOW) == pytest.approx(30.0)
    # A huge backlog of denied slots stays capped too.
    lim = make_limit("db", limit=30, leased_slots=30, denied_slots=16_000)
    assert policy(max_wait=30.0).seconds([lim], 1, NOW) == pytest.approx(30.0)
    # The cap holds after the jitter too: the top of the jitter does not take it to 39 s.
    assert policy(1.3, max_wait=30.0).seconds([lim], 1, NOW) == pytest.approx(30.0)
    assert policy(JITTER_LOW, max_wait=30.0).seconds([lim], 1, NOW) == pytest.approx(30.0 * JITTER_LOW)


def test_retry_of_tag_limits_is_capped_at_tag_max_wait() -> None:
    lim = make_limit("tag:etl", limit=1, leased_slots=1, avg_slot_occupancy_seconds=10_800.0)
    assert policy(max_wait=30.0, tag_max_wait=10.0).seconds([lim], 1, NOW) == pytest.approx(10.0)
    # Low averages are not raised to the cap.
    lim = replace(lim, avg_slot_occupancy_seconds=2.0)
    assert policy(tag_max_wait=10.0).seconds([lim], 1, NOW) == pytest.approx(1.0)


def test_retry_for_a_rate_limit_is_the_exact_decay_wait() -> None:
    # Full pool of 5 at 0.5 slot/s, 0.5 s into the next slot's 2 s: one slot frees in 1.5 s.
    lim = make_limit(limit=5, pool_slots=5, pool_clock=NOW - 0.5, slot_decay_per_second=0.5)
    assert policy().seconds([lim.settled(NOW)], 1, NOW) == pytest.approx(1.5)
    # Two slots wanted: the second frees 2 s after the first.
    assert policy().seconds([lim.settled(NOW)], 2, NOW) == pytest.approx(3.5)


def test_retry_for_a_slow_rate_limit_is_capped() -> None:
    lim = make_limit(limit=1, pool_slots=1, slot_decay_per_second=0.001)
    assert policy(max_wait=30.0).seconds([lim], 1, NOW) == pytest.approx(30.0)


def test_retry_when_leases_block_a_decaying_limit_uses_the_estimate() -> None:
    # The pool cannot free enough: the leases must be released, so the estimate applies.
    lim = make_limit(limit=2, pool_slots=1, leased_slots=1, slot_decay_per_second=1.0)
    assert policy().seconds([lim], 2, NOW) == pytest.approx(2.0 / 2 * 2 / 2)


def test_retry_waits_for_the_slowest_blocking_limit_and_skips_free_ones() -> None:
    quick = make_limit("quick", limit=4, leased_slots=4, avg_slot_occupancy_seconds=1.0)
    slow = make_limit("slow", limit=1, leased_slots=1, avg_slot_occupancy_seconds=6.0)
    free = make_limit("free", limit=100, avg_slot_occupancy_seconds=29.0)
    assert policy().seconds([quick, slow, free], 1, NOW) == pytest.approx(3.0)


def test_retry_counts_the_slots_queued_ahead() -> None:
    lim = make_limit(limit=2, leased_slots=2)
    # Two slots queued ahead: the share is (1 + 2) / 2 of half the 2 s average.
    assert policy().seconds([lim], 1, NOW, queued={lim.id: 2}) == pytest.approx(1.5)
    # A limit with a free slot still blocks a poller when a waiter is queued for that slot.
    lim = make_limit(limit=2, leased_slots=1)
    assert policy().seconds([lim], 1, NOW) == pytest.approx(MIN_RETRY_AFTER_SECONDS)
    assert policy().seconds([lim], 1, NOW, queued={lim.id: 1}) == pytest.approx(2.0 / 2 * 2 / 2)
    assert policy().seconds([lim], 1, NOW, queued={"another-limit": 5}) == pytest.approx(
        MIN_RETRY_AFTER_SECONDS
    )


def test_retry_is_jittered_within_prefect_bounds() -> None:
    lim = make_limit(limit=1, leased_slots=1, avg_slot_occupancy_seconds=4.0)  # hint 2.0
    rng = random.Random(1234)
    draws = [RetryPolicy(rng=rng).seconds([lim], 1, NOW) for _ in range(2000)]
    assert all(JITTER_LOW * 2.0 - 1e-12 <= d <= 1.3 * 2.0 + 1e-12 for d in draws)
    assert min(draws) < 0.77 * 2.0
    assert max(draws) > 1.28 * 2.0
    assert len(set(draws)) > 1900


def test_jitter_bounds_are_prefects() -> None:
    assert policy(1.3).jitter(10.0) == pytest.approx(13.0)
    assert pytest.approx(0.7518, abs=1e-4) == JITTER_LOW
    assert policy(JITTER_LOW).jitter(10.0) == pytest.approx(10.0 * JITTER_LOW)


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    first = [RetryPolicy(rng=random.Random(7)).jitter(3.0) for _ in range(3)]
    second = [RetryPolicy(rng=random.Random(7)).jitter(3.0) for _ in range(3)]
    assert first == second


def test_retry_is_never_below_the_minimum() -> None:
    # A tiny estimate (avg 0.1 s shared over 1000 slots), at the low end of the jitter.
    lim = make_limit(limit=1000, leased_slots=1000, avg_slot_occupancy_seconds=0.1)
    assert policy(JITTER_LOW).seconds([lim], 1, NOW) >= MIN_RETRY_AFTER_SECONDS
    assert policy(1.3).seconds([lim], 1, NOW) == pytest.approx(1.3 * MIN_RETRY_AFTER_SECONDS)
    # Nothing blocking at all (a caller's race): still a positive, non-spinning hint.
    assert policy(JITTER_LOW).seconds([], 1, NOW) >= MIN_RETRY_AFTER_SECONDS
    rng = random.Random(99)
    assert min(RetryPolicy(rng=rng).seconds([lim], 1, NOW) for _ in range(500)) >= MIN_RETRY_AFTER_SECONDS


def test_slots_unavailable_carries_the_policy_hint() -> None:
    lim = make_limit(limit=2, leased_slots=2)
    with pytest.raises(SlotsUnavailable) as info:
        decide_acquire([lim], 1, Mode.CONCURRENCY, leased=True, now=NOW, retry_after=policy())
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.detail == "Locked"


def test_retry_hint_considers_active_limits_only() -> None:
    asleep = make_limit("asleep", active=False, limit=1, pool_slots=1, avg_slot_occupancy_seconds=20.0)
    full = make_limit("full", limit=1, leased_slots=1, avg_slot_occupancy_seconds=3.0)
    with pytest.raises(SlotsUnavailable) as info:
        decide_acquire([asleep, full], 1, Mode.CONCURRENCY, leased=True, now=NOW, retry_after=policy())
    assert info.value.retry_after == pytest.approx(1.5)


# --- no barging, waitable requests, v1 holds ----------------------------------------------------


def test_a_newcomer_is_refused_while_waiters_are_queued_whatever_is_free() -> None:
    free = make_limit(limit=2, avg_slot_occupancy_seconds=2.0)  # both slots free
    with pytest.raises(SlotsUnavailable) as info:
        decide_acquire(
            [free], 1, Mode.CONCURRENCY, leased=True, now=NOW, retry_after=policy(), queued={free.id: 2}
        )
    # The hint counts the queue: (1 asked + 2 queued) / 2 of half the average hold.
    assert info.value.retry_after == pytest.approx(2.0 * 0.5 * 3 / 2)


def test_waiters_on_an_inactive_or_unnamed_limit_do_not_block() -> None:
    asleep = make_limit("asleep", active=False)
    free = make_limit("free")
    decision = decide_acquire(
        [asleep, free],
        1,
        Mode.CONCURRENCY,
        leased=True,
        now=NOW,
        retry_after=policy(),
        queued={asleep.id: 1, "id-other": 3},
    )
    assert decision.grant_slots == {asleep.id: 0, free.id: 1}


def test_a_request_that_can_never_succeed_is_refused_before_the_queue_is_looked_at() -> None:
    lim = make_limit(limit=1)
    with pytest.raises(InvalidRequest, match=SLOTS_TOO_MANY):
        decide_acquire(
            [lim], 2, Mode.CONCURRENCY, leased=True, now=NOW, retry_after=policy(), queued={lim.id: 1}
        )


@pytest.mark.parametrize(
    ("names", "found", "mode", "message"),
    [
        (
            ["db", "gone", "also"],
            ["db"],
            Mode.CONCURRENCY,
            "Cannot wait for limits that do not exist: 'also', 'gone'",
        ),
        (["off"], ["off"], Mode.CONCURRENCY, "Cannot wait for inactive limits (they never block): 'off'"),
        (["db"], ["db"], Mode.RATE_LIMIT, "wait_seconds applies to mode 'concurrency'"),
    ],
    ids=["missing", "inactive", "rate-limit"],
)
def test_what_cannot_be_waited_for(names: list[str], found: list[str], mode: Mode, message: str) -> None:
    limits = [make_limit(n, active=n != "off") for n in found]
    with pytest.raises(InvalidRequest) as refused:
        domain.check_waitable(names, limits, mode)
    assert refused.value.detail.startswith(message)


def test_a_waitable_request_passes() -> None:
    domain.check_waitable(["db", "db"], [make_limit("db")], Mode.CONCURRENCY)


def test_a_deleted_limit_refuses_its_waiters_as_a_missing_one_refuses_newcomers() -> None:
    assert domain.deleted_while_waiting("db") == (
        "Cannot wait for limits that do not exist: 'db' (deleted while the request waited)"
    )


def test_a_tag_limit_of_zero_would_deadlock_a_v1_hold_active_or_not() -> None:
    with pytest.raises(SlotsUnavailable) as info:
        domain.check_tag_hold([make_limit("tag:a"), make_limit("tag:etl", limit=0, active=False)])
    assert info.value.retry_after is None
    assert info.value.detail == (
        'The concurrency limit on tag "etl" is 0 and will deadlock if the task tries to run again.'
    )
    domain.check_tag_hold([make_limit("tag:a")])


def test_a_v1_hold_takes_one_leased_slot_per_tag() -> None:
    a, b = make_limit("tag:a", fencing_token=3), make_limit("tag:b")
    decision = domain.decide_tag_hold([a, b], {}, NOW, policy())
    assert decision.grant_slots == {a.id: 1, b.id: 1}
    assert [lim.fencing_token for lim in decision.limits] == [4, 1]


@pytest.mark.parametrize(
    ("b_fields", "queued"),
    [({"leased_slots": 5}, {}), ({"leased_slots": 4}, {"id-tag:b": 1})],
    ids=["full", "queued"],
)
def test_a_v1_hold_names_the_first_full_or_queued_tag(
    b_fields: dict[str, Any], queued: dict[str, int]
) -> None:
    a, b, c = make_limit("tag:a"), make_limit("tag:b", **b_fields), make_limit("tag:c", leased_slots=5)
    with pytest.raises(SlotsUnavailable) as info:
        domain.decide_tag_hold([a, b, c], queued, NOW, policy(tag_max_wait=10.0))
    assert info.value.detail == "Concurrency limit for the b tag has been reached"
    assert info.value.retry_after is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5f0c3c6e-8b0e-4bb4-9d8e-2a7f1d0c9b11", True),
        ("5F0C3C6E-8B0E-4BB4-9D8E-2A7F1D0C9B11", True),
        ("5f0c3c6e8b0e4bb49d8e2a7f1d0c9b11", True),
        ("db", False),
        ("5f0c3c6e-8b0e-4bb4-9d8e", False),
        ("", False),
    ],
)
def test_looks_like_uuid(value: str, expected: bool) -> None:
    assert looks_like_uuid(value) is expected
