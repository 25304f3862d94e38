"""The rules of slots, as pure functions: no I/O, no clock, no randomness of their own.

Every decision the server takes about slots is made here, from values that storage loaded inside
its transaction: may these slots be granted, what does decay leave, how long should a refused
caller wait, how does the occupancy average move. Storage, the HTTP routes, the reaper and the
tests all call these functions, so the rules exist once.

Occupancy model (the invariant the whole server keeps):

    occupied(limit) = pool(limit, now) + sum of slots of the live grants on that limit

* A *grant* is a row that ties a lease to one limit with a number of slots. It is live while its
  lease has not expired. Leased slots never decay; they come back when the lease is released,
  expires, or the limit is deleted.
* The *pool* holds the slots taken without a lease: plain ``/increment``, ``rate_limit`` mode and
  ``active_slots`` set by an operator. The pool decays at ``slot_decay_per_second`` (a leaky
  bucket) and shrinks on plain ``/decrement``.

Neither number is a counter kept beside the grants: occupancy is computed from the grant rows and
the pool in the same transaction that decides, so it cannot drift from what holders hold.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from slotkeeper.errors import Conflict, InvalidRequest, SlotsUnavailable

#: Prefect's pattern for limit names: non-empty, none of ``/ % & > <`` (the API validates names
#: with it, see ``api/schemas.py``).
NAME_PATTERN = r"^[^/%&><]+$"
#: A tag-based (v1) limit is the limit named ``tag:<tag>`` (as in Prefect since 3.4.19).
TAG_PREFIX = "tag:"

#: Starting value of the per-limit moving average of how long one slot is held.
DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS = 2.0
#: Lower bound of one occupancy sample, per slot (Prefect's value).
MIN_OCCUPANCY_SAMPLE_SECONDS = 0.1
#: Upper bound of one occupancy sample per slot, and so of the average (about 31.7 years): a
#: ``/decrement`` that reports more is refused (422), a longer hold counts as this much. The
#: average moves by convex steps between bounded samples, so it stays finite: a sample near the
#: largest float once made it overflow to Inf, then NaN, and broke its limit for good.
MAX_OCCUPANCY_SECONDS = 1e9
#: The moving average spans about ``limit * OCCUPANCY_SAMPLE_MULTIPLIER`` samples.
OCCUPANCY_SAMPLE_MULTIPLIER = 2
#: Jitter on Retry-After: a value drawn in [0.7518, 1.3] times the average (Prefect's bounds).
_JITTER_UPPER = 1.3
_JITTER_LOWER = math.log2(2**_JITTER_UPPER / (2**_JITTER_UPPER - 1))
#: The part of the average hold a refused caller is told to wait (see ``RetryPolicy.seconds``).
RESIDUAL_HOLD_SHARE = 0.5
#: Retry-After is never below this, so a refused client never spins.
MIN_RETRY_AFTER_SECONDS = 0.05


class Mode(StrEnum):
    """How an acquisition holds its slots."""

    CONCURRENCY = "concurrency"
    RATE_LIMIT = "rate_limit"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit as storage loaded it, plus the sum of its live grants (``leased_slots``).

    ``pool_slots`` is the stored, undecayed pool as of ``pool_clock``; read it through
    :meth:`settled` or :meth:`occupied`.
    """

    id: str
    name: str
    limit: int
    active: bool
    pool_slots: int
    pool_clock: float
    leased_slots: int
    slot_decay_per_second: float
    denied_slots: int
    avg_slot_occupancy_seconds: float
    fencing_token: int
    created: float
    updated: float
    pool_event_id: str | None = None

    def settled(self, now: float) -> Limit:
        """The same limit with decay applied up to ``now`` (see :func:`decay_pool`)."""
        pool, clock = decay_pool(self.pool_slots, self.pool_clock, self.slot_decay_per_second, now)
        return evolve(self, pool_slots=pool, pool_clock=clock)

    def occupied(self, now: float) -> int:
        """Slots in use at ``now``: the decayed pool plus the live grants."""
        return self.settled(now).pool_slots + self.leased_slots


_LIMIT_FIELDS = Limit.__slots__
_LIMIT_FIELD_SET = frozenset(_LIMIT_FIELDS)
_new = object.__new__
_set = object.__setattr__


def evolve(limit: Limit, **changes: Any) -> Limit:
    """``dataclasses.replace(limit, **changes)`` at half its cost: every acquisition and release
    copies its limits once or twice (the fields are set as the frozen ``__init__`` sets them)."""
    if not changes.keys() <= _LIMIT_FIELD_SET:
        raise TypeError(f"Limit has no field {sorted(changes.keys() - _LIMIT_FIELD_SET)}")
    new = _new(Limit)
    for name in _LIMIT_FIELDS:
        _set(new, name, changes[name] if name in changes else getattr(limit, name))
    return new


def decay_pool(pool: int, clock: float, rate: float, now: float) -> tuple[int, float]:
    """Apply leaky-bucket decay to the pool; return the new pool and its clock.

    Whole slots leave the pool at ``rate`` per second. Unlike Prefect, the fraction of a slot
    that has decayed is kept: the clock only advances by the time the whole slots took, so a
    rate limit of 10/s grants 10 per second however often it is read or written. An empty pool
    does not bank decay: its clock is ``now``.
    """
    if pool <= 0:
        return 0, now
    if rate <= 0:
        # Nothing decays, so there is no progress to keep: a rate set later counts from then on.
        return pool, now
    if now <= clock:
        return pool, clock
    gone = math.floor((now - clock) * rate)
    if gone >= pool:
        return 0, now
    return pool - gone, clock + gone / rate


@dataclass(frozen=True, slots=True)
class Acquisition:
    """A decided grant: the limits as they must be written, and slots per grant row."""

    limits: list[Limit]
    grant_slots: dict[str, int]


def decide_acquire(
    limits: Sequence[Limit],
    slots: int,
    mode: Mode,
    *,
    leased: bool,
    now: float,
    retry_after: RetryPolicy,
    queued: dict[str, int] | None = None,
) -> Acquisition:
    """Decide an all-or-nothing acquisition of ``slots`` on every active limit in ``limits``.

    Inactive limits are carried along (listed, leased) but never counted, as in Prefect.
    Raises :class:`InvalidRequest` for a request that can never succeed and
    :class:`SlotsUnavailable` for one that cannot succeed now. ``leased`` says whether the slots
    are held by a lease (grant rows) or go to the pool; ``rate_limit`` slots always go to the
    pool, since they come back by decay.

    ``queued``: the slots that waiters queued on the server wait for, per limit id. No barging:
    slots that free up belong to the queue, so a newcomer (waiting or polling) is refused while
    any of its active limits has waiters, whatever is free right now; its Retry-After counts
    them.
    """
    check_request(limits, slots, mode)
    # Each limit's pool decayed to ``now`` (what ``Limit.settled`` holds), the limits themselves
    # copied only once, as they are written: every acquisition passes here.
    decayed = [decay_pool(lim.pool_slots, lim.pool_clock, lim.slot_decay_per_second, now) for lim in limits]
    active = [(lim, pool) for lim, (pool, _) in zip(limits, decayed, strict=True) if lim.active]
    ahead = {lim.id: queued[lim.id] for lim, _ in active if lim.id in queued} if queued else {}
    if ahead:
        raise SlotsUnavailable(
            retry_after.seconds([lim.settled(now) for lim, _ in active], slots, now, ahead)
        )
    if any(pool + lim.leased_slots + slots > lim.limit for lim, pool in active):
        raise SlotsUnavailable(retry_after.seconds([lim.settled(now) for lim, _ in active], slots, now))

    to_pool = mode is Mode.RATE_LIMIT or not leased
    written: list[Limit] = []
    grant_slots: dict[str, int] = {}
    for lim, (pool, clock) in zip(limits, decayed, strict=True):
        held = slots if lim.active else 0
        if to_pool:
            pool += held
        else:
            grant_slots[lim.id] = held
        written.append(evolve(lim, pool_slots=pool, pool_clock=clock, fencing_token=lim.fencing_token + 1))
    return Acquisition(limits=written, grant_slots=grant_slots)


@dataclass(frozen=True, slots=True)
class Waiter:
    """An acquisition queued on the server.

    ``sequence`` is its place in the arrival order: unique, increasing with every waiter queued
    (storage draws it when it queues the waiter). Not a time: clocks may stand still or differ
    between processes, and two arrivals must never tie.
    """

    id: str
    limit_ids: tuple[str, ...]
    slots: int
    priority: int
    sequence: int


def queue_order(waiter: Waiter) -> tuple[int, int]:
    """The queue's order: higher priority first, then arrival (``sorted(..., key=queue_order)``)."""
    return -waiter.priority, waiter.sequence


def admit(waiters: Sequence[Waiter], limits: dict[str, Limit], now: float) -> list[Waiter]:
    """The waiters to grant now, in queue order (:func:`queue_order`, whatever order ``waiters``
    come in), given the locked ``limits``.

    Strict FIFO per limit (within a priority): a waiter that cannot have all its slots blocks
    every limit it names, so no later waiter takes slots it is waiting for, and a waiter of
    several limits is granted all of them at once, never part. Since every waiter holds nothing
    while it waits and the order is one total order, there is no deadlock; a waiter only waits
    for the holders and the waiters ahead of it, each bounded by its lease.
    A waiter asking more than a limit's size (the limit was lowered) can never fit; it does not
    block others and leaves the queue when it times out.
    """
    free = {i: lim.limit - lim.occupied(now) for i, lim in limits.items() if lim.active}
    blocked: set[str] = set()
    granted: list[Waiter] = []
    for waiter in sorted(waiters, key=queue_order):
        active = [i for i in waiter.limit_ids if i in free]
        if any(limits[i].limit < waiter.slots for i in active):
            continue
        if any(i in blocked for i in active):
            blocked.update(active)
            continue
        if all(free[i] >= waiter.slots for i in active):
            for i in active:
                free[i] -= waiter.slots
            granted.append(waiter)
        else:
            blocked.update(active)
    return granted


def check_waitable(names: Sequence[str], found: Sequence[Limit], mode: Mode) -> None:
    """A request that asks to wait (``wait_seconds``) must name limits that exist, are active,
    and count slots (mode ``concurrency``): :class:`InvalidRequest` (422) otherwise.

    Prefect's answer for those (an immediate, empty or uncounted grant) is kept for requests
    that do not wait; one that asks to wait is told why waiting makes no sense.
    """
    missing = sorted(set(names) - {lim.name for lim in found})
    if missing:
        raise InvalidRequest(_cannot_wait_for_missing(missing), code="cannot_wait")
    inactive = [lim.name for lim in found if not lim.active]
    if inactive:
        raise InvalidRequest(
            f"Cannot wait for inactive limits (they never block): {', '.join(map(repr, inactive))}",
            code="cannot_wait",
        )
    if mode is not Mode.CONCURRENCY:
        raise InvalidRequest(
            "wait_seconds applies to mode 'concurrency'; a rate limit's Retry-After is computed from its decay",
            code="cannot_wait",
        )


def _cannot_wait_for_missing(names: Sequence[str]) -> str:
    return f"Cannot wait for limits that do not exist: {', '.join(map(repr, names))}"


def deleted_while_waiting(name: str) -> str:
    """What a waiting request is told (422) when a limit it waits for is deleted: what a new
    request that waits for it would be told (see :func:`check_waitable`), and why."""
    return f"{_cannot_wait_for_missing([name])} (deleted while the request waited)"


def check_tag_hold(limits: Sequence[Limit]) -> None:
    """A v1 hold (one slot on each tag) on a tag whose limit is 0, active or not, would deadlock
    its task run if it retried: :class:`SlotsUnavailable` without a retry hint (Prefect)."""
    zero = next((lim for lim in limits if lim.limit == 0), None)
    if zero is not None:
        raise SlotsUnavailable(
            None, tag_deadlock_detail(zero.name.removeprefix(TAG_PREFIX)), code="limit_is_zero"
        )


def decide_tag_hold(
    active: Sequence[Limit], queued: dict[str, int], now: float, retry_after: RetryPolicy
) -> Acquisition:
    """Decide a v1 hold: one leased slot on each of these active tag limits, all or nothing.

    As Prefect's v1 API, a tag is refused when it is full, and here also when waiters are queued
    on it (no barging): :class:`SlotsUnavailable` naming the first such tag, with a Retry-After
    that counts the queue (``queued``: slots waited for, per limit id).
    """
    settled = [lim.settled(now) for lim in active]
    full = next(
        (lim for lim in settled if lim.pool_slots + lim.leased_slots + queued.get(lim.id, 0) >= lim.limit),
        None,
    )
    if full is not None:
        seconds = retry_after.seconds(settled, 1, now, queued)
        raise SlotsUnavailable(seconds, tag_reached_detail(full.name.removeprefix(TAG_PREFIX)))
    return decide_acquire(active, 1, Mode.CONCURRENCY, leased=True, now=now, retry_after=retry_after)


def tag_deadlock_detail(tag: str) -> str:
    """Prefect's 423 detail for a tag whose limit is 0 (sent without ``Retry-After``)."""
    return f'The concurrency limit on tag "{tag}" is 0 and will deadlock if the task tries to run again.'


def tag_reached_detail(tag: str) -> str:
    """Prefect's 423 detail for a full tag (sent with ``Retry-After``)."""
    return f"Concurrency limit for the {tag} tag has been reached"


def check_request(limits: Sequence[Limit], slots: int, mode: Mode) -> None:
    """Refuse (:class:`InvalidRequest`, 422) a request that can never succeed, in Prefect's order:
    more slots than an active limit holds, then ``rate_limit`` on active limits without decay."""
    candidates = [lim for lim in limits if lim.active]
    if any(lim.limit < slots for lim in candidates):
        raise InvalidRequest("Slots requested is greater than the limit", code="slots_exceed_limit")
    if mode is Mode.RATE_LIMIT:
        without_decay = [lim.name for lim in candidates if lim.slot_decay_per_second <= 0]
        if without_decay:
            raise InvalidRequest(
                "Only concurrency limits with slot decay can be used for rate limiting. "
                f"The following limits do not have a decay configured: '{','.join(without_decay)}'",
                code="rate_limit_without_decay",
            )


def release_pool(limit: Limit, slots: int, now: float) -> Limit:
    """Plain ``/decrement``: take ``slots`` out of the decayed pool, never below zero.

    Leased slots are not touched: they belong to their lease and only its release frees them.
    """
    settled = limit.settled(now)
    return replace(settled, pool_slots=max(0, settled.pool_slots - slots))


def next_avg_occupancy(avg: float, occupancy_seconds: float, slots: int, limit: int) -> float:
    """Move the occupancy average towards one new sample (Prefect's moving average).

    Unlike Prefect, a limit of 0 counts as 1 sample window instead of dividing by zero, so a
    release after the limit was set to 0 succeeds.
    """
    avg = occupancy_average(avg)
    per_slot = occupancy_seconds / max(slots, 1)
    if not per_slot >= MIN_OCCUPANCY_SAMPLE_SECONDS:  # NaN too
        per_slot = MIN_OCCUPANCY_SAMPLE_SECONDS
    per_slot = min(per_slot, MAX_OCCUPANCY_SECONDS)
    window = max(limit * OCCUPANCY_SAMPLE_MULTIPLIER, 1)
    return avg + (per_slot - avg) / window


def occupancy_average(avg: float) -> float:
    """A stored average as the rules use it: within the bounds of a sample; one that is not a
    number (written before the bound existed) starts again from the default."""
    if not math.isfinite(avg):
        return DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS
    return min(max(avg, MIN_OCCUPANCY_SAMPLE_SECONDS), MAX_OCCUPANCY_SECONDS)


def check_active_slots(active_slots: int, limit: int) -> None:
    """An operator may say how many slots are taken (``active_slots``, at create or update), never
    more than the limit has (:class:`InvalidRequest`, 422; Prefect accepts it). Lowering the
    limit below what is taken stays allowed: the holders keep their slots."""
    if active_slots > limit:
        raise InvalidRequest(
            f"active_slots cannot be set to {active_slots}: the limit is {limit}",
            code="active_slots_above_limit",
        )


def set_active_slots(limit: Limit, active_slots: int, now: float) -> Limit:
    """An operator sets ``active_slots``: the pool takes whatever the live grants do not hold.

    More than the limit is refused (:func:`check_active_slots`). Setting it below what live
    leases hold would forget real holders; that is refused (the caller turns the error into 409)
    instead of letting the count lie.
    """
    check_active_slots(active_slots, limit.limit)
    if active_slots < limit.leased_slots:
        raise Conflict(
            f"active_slots cannot be set to {active_slots}: live leases hold "
            f"{limit.leased_slots} slot(s) of this limit. Release those leases first "
            "(list them with GET /api/v2/concurrency_limits/{name}/leases).",
            code="active_slots_below_leased",
        )
    return replace(limit, pool_slots=active_slots - limit.leased_slots, pool_clock=now)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a refused caller is told to wait (the ``Retry-After`` header).

    ``max_wait`` caps every hint (Prefect caps only limits without decay); ``tag_max_wait`` is
    the cap for ``tag:`` limits. ``rng`` supplies the jitter so tests can fix it.
    """

    max_wait: float = 30.0
    tag_max_wait: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def seconds(
        self,
        blocking: Sequence[Limit],
        slots: int,
        now: float,
        queued: dict[str, int] | None = None,
    ) -> float:
        """A jittered, capped wait for ``slots`` on the active limits ``blocking`` (settled).

        ``queued`` holds, per limit id, the slots that waiters queued on the server are waiting
        for: a polling caller is behind them, so the hint grows with the queue.
        """
        queued = queued or {}
        best, best_cap = 0.0, self.max_wait
        for lim in blocking:
            cap = self.tag_max_wait if lim.name.startswith(TAG_PREFIX) else self.max_wait
            ahead = queued.get(lim.id, 0)
            excess = lim.pool_slots + lim.leased_slots + ahead + slots - lim.limit
            if excess <= 0:
                continue
            if lim.slot_decay_per_second > 0 and excess <= lim.pool_slots:
                # Exact: the time until enough pool slots have decayed.
                wait = excess / lim.slot_decay_per_second - (now - lim.pool_clock)
            else:
                # The time a slot takes to come back, scaled by the share asked for. Prefect
                # takes the whole average hold; but a caller refused at a random moment of a
                # hold waits, on average, for what is left of it: half (the residual life of
                # a hold). Measured with Prefect's own client (16 tasks, limit 1, 10 ms holds):
                # the run took 8.7 s with the whole average and 5.0 s with half, for the same
                # client CPU; a quarter was no quicker (the client's own CPU bounds it).
                share = (slots + ahead + lim.denied_slots) / max(lim.limit, 1)
                wait = occupancy_average(lim.avg_slot_occupancy_seconds) * RESIDUAL_HOLD_SHARE * share
            if min(wait, cap) >= best:
                best, best_cap = min(wait, cap), cap
        # The cap holds after the jitter (which may scale up to 1.3 times), and so does the floor
        # (jitter may scale down to 0.7518 times).
        hint = self.jitter(max(best, MIN_RETRY_AFTER_SECONDS))
        return max(min(hint, best_cap), MIN_RETRY_AFTER_SECONDS)

    def jitter(self, average: float) -> float:
        """A draw in [0.7518, 1.3] times ``average``, exponentially distributed inside."""
        low, high = math.exp(-_JITTER_UPPER), math.exp(-_JITTER_LOWER)
        return -math.log(self.rng.uniform(low, high)) * average


def looks_like_uuid(value: str) -> bool:
    """True when ``value`` parses as a UUID (as path lookups try ids first)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
