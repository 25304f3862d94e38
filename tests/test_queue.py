"""The server-side wait queue (``docs/queue.md``): storage on both backends, then through the API.

Storage tier (``storage`` fixture: SQLite and PostgreSQL, fake clock): FIFO and priorities, no
barging, all-or-nothing waits across limits, hand-off by every change that frees capacity, the
waiter timeout, abandoned waiters, cancellation at every step of an acquisition, and the two
ways a grant reaches its waiting request: handed over in memory to a request of this process
(:class:`Deliveries` watches or delays those deliveries), or collected from its row when another
process granted it (:func:`another_process`). For "cancelled while a storage operation is out",
:class:`Gate` stands between the acquiring task and the backend: it cancels the task right after
a chosen operation committed, and (as both real backends do) lets every sent operation run to
its end.

API tier (the real ASGI app): the same rules on the wire, the 422s, and a client that
disconnects, driven with raw ASGI messages so the disconnect comes exactly when wanted.

Waiting order is arrival order only up to the clock: the fake clock is advanced between arrivals
so that every waiter has its own ``enqueued`` time. No assertion depends on how long anything
takes; "until" loops are bounded only so that a broken queue fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from fastapi import FastAPI

from slotkeeper.api.app import create_app
from slotkeeper.domain import Mode
from slotkeeper.errors import InvalidRequest, SlotsUnavailable
from slotkeeper.models import AcquireRequest, Granted, LeaseSpec, LimitSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from slotkeeper.storage import waiting as storage_waiting
from tests.conftest import FakeClock

T = TypeVar("T")
V2 = "/v2/concurrency_limits"
#: Iterations of 5 ms before an "until" gives up (a bound against hanging, not a timing claim).
PATIENCE_STEPS = 6000
#: Long enough never to end during a test.
FOREVER = 3600.0


# --- helpers ---------------------------------------------------------------------------------------


async def make(storage: Storage, name: str, limit: int = 1, **fields: Any) -> str:
    view = await storage.create_limit(LimitSpec(name=name, limit=limit, **fields))
    return view.limit.id


def wanting(
    *names: str, slots: int = 1, wait: float | None = FOREVER, priority: int = 0, duration: float = 60.0
) -> AcquireRequest:
    return AcquireRequest(list(names), slots, Mode.CONCURRENCY, LeaseSpec(duration), wait, priority)


async def hold(storage: Storage, *names: str, slots: int = 1, duration: float = 60.0) -> str:
    """Take slots now (no wait); return the lease id."""
    granted = await storage.acquire(wanting(*names, slots=slots, wait=None, duration=duration))
    assert granted.lease_id is not None
    return granted.lease_id


async def occupied(storage: Storage, name: str) -> int:
    return (await storage.read_limit(name)).active_slots


async def lease_ids(storage: Storage, name: str) -> list[str]:
    return [info.lease_id for info in await storage.list_leases(name)]


async def waiter_rows(storage: Storage) -> list[tuple[Any, ...]]:
    """Every waiter row: (id, lease_id), in queue order."""
    rows = await storage.backend.run(
        lambda tx: tx.all("SELECT id, lease_id FROM waiters ORDER BY priority DESC, sequence")
    )
    return [tuple(r) for r in rows]


async def queued_count(storage: Storage) -> int:
    return sum(1 for _, lease in await waiter_rows(storage) if lease is None)


async def until(condition: Callable[[], Coroutine[Any, Any, bool]], what: str) -> None:
    for _ in range(PATIENCE_STEPS):
        if await condition():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"never happened: {what}")


async def arrive(storage: Storage, clock: FakeClock, request: AcquireRequest) -> asyncio.Task[Granted]:
    """Start a waiting acquisition and return once it is in the queue (one tick later than the
    previous arrival, so the queue order is this arrival order)."""
    before = await queued_count(storage)
    clock.advance(0.001)
    task = asyncio.create_task(storage.acquire(request))

    async def in_queue() -> bool:
        if task.done():
            pytest.fail(f"expected to wait, but: {task.result()}")
        return await queued_count(storage) == before + 1

    await until(in_queue, "the request queued")
    return task


async def settle(task: asyncio.Task[T]) -> T:
    """The outcome of a task that must end (bounded)."""
    return await asyncio.wait_for(task, 30)


# --- order ---------------------------------------------------------------------------------------


async def test_waiters_are_granted_in_arrival_order(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    deliveries = Deliveries(storage, monkeypatch)
    served: list[int] = []

    async def serve(task: asyncio.Task[Granted], i: int) -> int:
        granted = await settle(task)
        served.append(i)
        assert granted.lease_id is not None
        (lim,) = granted.limits
        await storage.release_lease(granted.lease_id)
        assert lim.fencing_token is not None
        return lim.fencing_token

    tasks = [await arrive(storage, clock, wanting("db")) for _ in range(5)]
    assert not any(t.done() for t in tasks)
    await storage.release_lease(holder)
    tokens = await asyncio.gather(*(serve(t, i) for i, t in enumerate(tasks)))
    assert served == [0, 1, 2, 3, 4]
    assert tokens == [2, 3, 4, 5, 6]  # the holder had 1; each grant after a wait has the next
    assert len({waiter for waiter, _ in deliveries.seen}) == len(deliveries.seen) == 5  # once each
    assert await occupied(storage, "db") == 0
    assert await waiter_rows(storage) == []


async def served_in_turn(storage: Storage, holder: str, tasks: list[asyncio.Task[Granted]]) -> list[int]:
    """Release ``holder``, then let each waiting request release its grant as it comes: the
    order (indexes into ``tasks``) in which they were served."""
    served: list[int] = []

    async def serve(task: asyncio.Task[Granted], i: int) -> None:
        granted = await settle(task)
        served.append(i)
        assert granted.lease_id is not None
        await storage.release_lease(granted.lease_id)

    await storage.release_lease(holder)
    await asyncio.gather(*(serve(t, i) for i, t in enumerate(tasks)))
    return served


async def test_waiters_queued_at_the_same_instant_are_granted_in_arrival_order(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrival order does not depend on the clock: waiters queued while it stands still (a
    coarse or frozen clock, or several processes) are served in the order they were queued,
    also when their ids sort the other way round."""
    countdown = iter(range(2**64, 0, -1))
    monkeypatch.setattr(storage_waiting.uuid, "uuid4", lambda: uuid.UUID(int=next(countdown)))
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    tasks: list[asyncio.Task[Granted]] = []

    async def queued(count: int) -> bool:
        return await queued_count(storage) == count

    for count in range(1, 7):  # the clock never moves
        tasks.append(asyncio.create_task(storage.acquire(wanting("db"))))
        await until(functools.partial(queued, count), "the request queued")
    served = await served_in_turn(storage, holder, tasks)
    assert served == [0, 1, 2, 3, 4, 5]


async def test_a_higher_priority_is_served_first_then_arrival_order(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    priorities = [0, 5, 0, 10, 5, -1]
    tasks = [await arrive(storage, clock, wanting("db", priority=p)) for p in priorities]
    served = await served_in_turn(storage, holder, tasks)
    assert served == [3, 1, 4, 0, 2, 5]


async def test_a_polling_request_never_barges_in(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 2)
    holder = await hold(storage, "db")  # one slot of two taken
    big = await arrive(storage, clock, wanting("db", slots=2))  # waits for both
    # A slot is free at this instant, but it belongs to the queue.
    with pytest.raises(SlotsUnavailable) as refused:
        await storage.acquire(wanting("db", wait=None))
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    small = await arrive(storage, clock, wanting("db"))  # a newcomer that waits goes behind it
    assert await occupied(storage, "db") == 1
    await storage.release_lease(holder)
    granted = await settle(big)
    assert granted.lease_id is not None
    assert await occupied(storage, "db") == 2
    assert not small.done()
    await storage.release_lease(granted.lease_id)
    assert (await settle(small)).lease_id is not None


async def test_a_waiter_of_several_limits_blocks_each_and_takes_all_at_once(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "a", 1)
    await make(storage, "b", 1)
    holder = await hold(storage, "a")
    both = await arrive(storage, clock, wanting("a", "b"))
    only_b = await arrive(storage, clock, wanting("b"))  # b is free, but "both" is ahead on b
    assert await occupied(storage, "b") == 0
    await storage.release_lease(holder)
    granted = await settle(both)
    assert sorted(lim.name for lim in granted.limits) == ["a", "b"]
    assert (await occupied(storage, "a"), await occupied(storage, "b")) == (1, 1)
    assert not only_b.done()
    assert granted.lease_id is not None
    await storage.release_lease(granted.lease_id)
    (lim,) = (await settle(only_b)).limits
    assert lim.name == "b"


# --- hand-off: every change that frees capacity admits the head of the queue -----------------------


async def test_an_expired_lease_hands_its_slot_to_the_queue(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    await hold(storage, "db", duration=10)
    task = await arrive(storage, clock, wanting("db"))
    clock.advance(11)
    assert await storage.reap_expired() == 1
    assert (await settle(task)).lease_id is not None


async def test_a_plain_decrement_hands_its_slot_to_the_queue(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1, active_slots=1)  # the slot is in the pool (no lease)
    task = await arrive(storage, clock, wanting("db"))
    await storage.release_slots(["db"], 1, None)
    assert (await settle(task)).lease_id is not None


async def test_raising_the_limit_admits_waiters(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    await hold(storage, "db")
    first = await arrive(storage, clock, wanting("db"))
    second = await arrive(storage, clock, wanting("db"))
    await storage.update_limit("db", {"limit": 2})
    assert (await settle(first)).lease_id is not None
    assert not second.done()
    await storage.update_limit("db", {"limit": 3})
    assert (await settle(second)).lease_id is not None


DELETED_A = "Cannot wait for limits that do not exist: 'a' (deleted while the request waited)"


@pytest.mark.parametrize("names", [("a",), ("a", "b")], ids=["its-only-limit", "one-of-its-limits"])
@pytest.mark.parametrize("deleter", ["this-process", "another-process"])
async def test_deleting_a_limit_refuses_its_waiters_at_once(
    storage: Storage, clock: FakeClock, names: tuple[str, ...], deleter: str
) -> None:
    """A waiter for a limit that is deleted is refused when the deletion commits, as a request
    that waits for a limit that does not exist is (422), not left waiting until its timeout;
    also when it waits for other limits too (it asked for all of them at once). Its refusal is
    handed over in memory, or (deleted by another process) read from its row once woken. It
    leaves every queue: a waiter behind it on its other limit goes ahead."""
    await make(storage, "a", 1)
    await make(storage, "b", 1)
    await hold(storage, "a")
    refused = await arrive(storage, clock, wanting(*names))
    behind = await arrive(storage, clock, wanting("b")) if "b" in names else None
    deleting = another_process(storage) if deleter == "another-process" else storage
    await deleting.delete_limit("a")
    with pytest.raises(InvalidRequest) as info:
        await settle(refused)
    assert info.value.detail == DELETED_A
    held_on_b = []
    if behind is not None:
        granted = await settle(behind)
        assert [lim.name for lim in granted.limits] == ["b"]
        held_on_b.append(granted.lease_id)
    assert await waiter_rows(storage) == []
    assert await lease_ids(storage, "b") == held_on_b  # the refused waiter holds nothing


async def test_a_refusal_read_at_the_deadline_is_still_the_answer(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused by another process, but never woken (a lost notification): at its deadline the
    request finds the refusal on its row and answers it, not a timeout."""
    monkeypatch.setattr(storage.waiters, "wake", lambda woken: None)
    await make(storage, "a", 1)
    await hold(storage, "a")
    task = await arrive(storage, clock, wanting("a", wait=0.2))
    await another_process(storage).delete_limit("a")
    with pytest.raises(InvalidRequest) as info:
        await settle(task)
    assert info.value.detail == DELETED_A
    assert await waiter_rows(storage) == []


async def test_decay_admits_waiters_on_the_reapers_pass(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1, active_slots=1, slot_decay_per_second=1.0)
    task = await arrive(storage, clock, wanting("db"))
    clock.advance(2)  # the pool slot has decayed; nothing released it
    await storage.sweep_waiters()
    assert (await settle(task)).lease_id is not None


async def test_a_waiter_that_can_never_fit_does_not_block_the_others(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 3)
    holder = await hold(storage, "db", slots=2)
    too_big = await arrive(storage, clock, wanting("db", slots=3, wait=0.2))
    small = await arrive(storage, clock, wanting("db"))
    await storage.update_limit("db", {"limit": 2})  # "too_big" can never fit any more
    await storage.release_lease(holder)
    assert (await settle(small)).lease_id is not None
    with pytest.raises(SlotsUnavailable, match=r"Timed out after waiting 0\.2 s for slots"):
        await settle(too_big)


# --- ending a wait ---------------------------------------------------------------------------------


async def test_a_wait_times_out_with_a_retry_after_and_leaves_the_queue(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    with pytest.raises(SlotsUnavailable, match=r"^Timed out after waiting 0.05 s for slots$") as refused:
        await storage.acquire(wanting("db", wait=0.05))
    assert refused.value.retry_after is not None
    assert await waiter_rows(storage) == []
    assert await lease_ids(storage, "db") == [holder]


async def test_a_waiter_whose_process_stopped_is_swept(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_waiting, "WAITER_HEARTBEAT_SECONDS", FOREVER)  # as if its process died
    await make(storage, "db", 1)
    await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db", wait=0.3))
    clock.advance(storage_waiting.WAITER_STALE_SECONDS + 1)
    assert await storage.sweep_waiters() == 1
    assert await waiter_rows(storage) == []
    with pytest.raises(SlotsUnavailable, match="abandoned"):
        await settle(task)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (wanting("nope"), "Cannot wait for limits that do not exist: 'nope'"),
        (wanting("db", "nope"), "Cannot wait for limits that do not exist: 'nope'"),
        (wanting("off"), "Cannot wait for inactive limits (they never block): 'off'"),
        (
            AcquireRequest(["rate"], 1, Mode.RATE_LIMIT, LeaseSpec(60.0), 10.0),
            "wait_seconds applies to mode 'concurrency'",
        ),
    ],
    ids=["unknown", "one-unknown", "inactive", "rate-limit"],
)
async def test_what_cannot_be_waited_for(storage: Storage, request_: AcquireRequest, message: str) -> None:
    await make(storage, "db", 1)
    await make(storage, "off", 1, active=False)
    await make(storage, "rate", 1, slot_decay_per_second=1.0)
    with pytest.raises(InvalidRequest) as refused:
        await storage.acquire(request_)
    assert refused.value.detail.startswith(message)
    assert await waiter_rows(storage) == []


# --- cancellation at every step ---------------------------------------------------------------------


class Gate:
    """Stands between one task and the backend: ``plan[n] == "cancel"`` sends that task's n-th
    storage operation and cancels the task the moment it has committed, before the task reads
    its answer. Every operation sent runs to its end, as on the real backends (a cancelled caller
    does not stop a transaction already queued or running)."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self._run = storage.backend.run
        self.target: asyncio.Task[Any] | None = None
        self.plan: dict[int, str] = {}
        self.calls = 0
        self.sent: set[asyncio.Future[Any]] = set()
        monkeypatch.setattr(storage.backend, "run", self.run)

    def run(self, op: Callable[[Any], T]) -> Awaitable[T]:
        # Not a coroutine function: the caller is the task running when the operation is sent,
        # even if the caller then awaits it from another task (as asyncio.shield does).
        task = asyncio.current_task()
        if task is None or task is not self.target:
            return self._run(op)
        index, self.calls = self.calls, self.calls + 1
        sent: asyncio.Future[T] = asyncio.ensure_future(self._run(op))
        self.sent.add(sent)
        if self.plan.get(index) == "cancel":
            # Registered before the caller awaits the answer: the cancellation lands first.
            sent.add_done_callback(lambda _: task.cancel())
        return sent

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        self.target = asyncio.create_task(coro)
        return self.target

    async def drain(self) -> None:
        """Wait for every operation that was sent to finish."""
        await asyncio.gather(*self.sent, return_exceptions=True)


async def outcome(task: asyncio.Task[Any]) -> BaseException | None:
    """How a task ended: its exception, a CancelledError, or None."""
    try:
        await asyncio.wait_for(asyncio.shield(task), 30)
    except BaseException as exc:
        return exc
    return None


def another_process(storage: Storage) -> Storage:
    """A second Storage on the same database, standing for another server process: its own
    waiters (none), so a waiter of ``storage`` that it admits is marked granted and woken, and
    collects its grant from its row, as across processes. Not closed: the backend is shared."""
    return Storage(storage.backend, clock=storage.clock, retry_policy=storage.retry_policy)


async def test_cancelled_while_queued_leaves_the_queue(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    first = await arrive(storage, clock, wanting("db"))
    second = await arrive(storage, clock, wanting("db"))
    first.cancel()
    assert isinstance(await outcome(first), asyncio.CancelledError)
    assert await queued_count(storage) == 1
    await storage.release_lease(holder)
    assert (await settle(second)).lease_id is not None  # the queue moved on without it


async def _equals(value: Coroutine[Any, Any, int], expected: int) -> bool:
    return await value == expected


# Cancelled while one of its own storage operations is out: the backend runs the operation to
# its end anyway, so what it did (a grant, a queued waiter) must be undone before the
# cancellation propagates. The API cancels the acquisition when the client disconnects, so
# this is a disconnect in those few milliseconds (see also tests/test_sdk.py).


@pytest.mark.parametrize("wait", [FOREVER, None], ids=["waiting", "not-waiting"])
async def test_cancelled_while_an_immediate_grant_is_being_written_releases_it(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, wait: float | None
) -> None:
    """A grant written for a caller that is gone is released: its lease id reaches nobody."""
    await make(storage, "db", 1)
    gate = Gate(storage, monkeypatch)
    gate.plan = {0: "cancel"}  # the slot is free: operation 0 grants at once
    task = gate.start(storage.acquire(wanting("db", wait=wait)))
    ended = await outcome(task)
    await gate.drain()
    assert await lease_ids(storage, "db") == []
    assert isinstance(ended, asyncio.CancelledError)


async def test_cancelled_while_being_queued_leaves_no_waiter(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter row inserted for a caller that is gone leaves the queue (it would block it)."""
    await make(storage, "db", 1)
    await hold(storage, "db")
    gate = Gate(storage, monkeypatch)
    gate.plan = {0: "cancel"}  # the limit is full: operation 0 inserts the waiter
    task = gate.start(storage.acquire(wanting("db")))
    ended = await outcome(task)
    await gate.drain()
    assert await waiter_rows(storage) == []
    assert isinstance(ended, asyncio.CancelledError)


async def test_cancelled_while_collecting_its_grant_releases_it(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Granted by another process, woken, and cancelled while collecting the grant from its
    row: the collected lease is released."""
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    gate = Gate(storage, monkeypatch)
    gate.plan = {1: "cancel"}  # operation 1 collects the grant, then the task is cancelled
    clock.advance(0.001)
    task = gate.start(storage.acquire(wanting("db")))
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    await another_process(storage).release_lease(holder)
    ended = await outcome(task)
    await gate.drain()
    assert await lease_ids(storage, "db") == []
    assert await waiter_rows(storage) == []
    assert isinstance(ended, asyncio.CancelledError)


async def test_cancelled_once_woken_but_before_collecting_releases_the_grant(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Granted by another process and cancelled before it looked at its row: the grant that
    waits there is released."""
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db"))
    wake = storage.waiters.wake

    def wake_then_cancel(woken: list[str] | None) -> None:
        wake(woken)
        task.cancel()  # before the task runs again

    monkeypatch.setattr(storage.waiters, "wake", wake_then_cancel)
    await another_process(storage).release_lease(holder)
    assert isinstance(await outcome(task), asyncio.CancelledError)
    assert await lease_ids(storage, "db") == []
    assert await waiter_rows(storage) == []


# --- the hand-off of a grant to a waiter of this process ---------------------------------------------


class Deliveries:
    """Records the hand-offs the backend delivers to ``storage`` after each commit; with
    ``hold``, keeps them back until :meth:`release` (as if they arrived late)."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch, *, hold: bool = False) -> None:
        self._deliver = storage.waiters.deliver
        self.hold = hold
        self.seen: list[tuple[str, Granted]] = []
        self.kept: list[tuple[str, Granted]] = []
        self.arrived = asyncio.Event()
        self.then: Callable[[], None] | None = None
        monkeypatch.setattr(storage.waiters, "deliver", self.deliver)

    def deliver(self, waiter_id: str, granted: Granted) -> None:
        self.seen.append((waiter_id, granted))
        self.arrived.set()
        if self.hold:
            self.kept.append((waiter_id, granted))
            return
        self._deliver(waiter_id, granted)
        if self.then is not None:
            self.then()

    def release(self) -> None:
        """Deliver what was kept back, and from now on deliver at once."""
        self.hold = False
        kept, self.kept = self.kept, []
        for waiter_id, granted in kept:
            self._deliver(waiter_id, granted)


async def released_events(storage: Storage) -> int:
    rows = await storage.backend.run(
        lambda tx: tx.all(
            "SELECT COUNT(*) FROM events WHERE event = :e", {"e": "prefect.concurrency-limit.released"}
        )
    )
    return int(rows[0][0])


async def test_a_waiter_of_this_process_gets_its_grant_without_a_transaction_of_its_own(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    gate = Gate(storage, monkeypatch)
    deliveries = Deliveries(storage, monkeypatch)
    clock.advance(0.001)
    task = gate.start(storage.acquire(wanting("db")))
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    await storage.release_lease(holder)
    granted = await settle(task)
    assert gate.calls == 1  # queueing it was its only transaction
    assert [g for _, g in deliveries.seen] == [granted]
    assert await waiter_rows(storage) == []  # left the queue in the admitting transaction
    assert await lease_ids(storage, "db") == [granted.lease_id]


async def test_the_handed_over_grant_is_the_one_a_collecting_waiter_gets(
    storage: Storage, clock: FakeClock
) -> None:
    """Same limits, same order (the request's), same fencing tokens, whichever path it took."""
    for name in ("c", "a", "b"):
        await make(storage, name, 1)

    async def waited(release: Callable[[str], Coroutine[Any, Any, bool]]) -> list[tuple[Any, ...]]:
        holder = await hold(storage, "a")
        task = await arrive(storage, clock, wanting("b", "a", "c"))
        await release(holder)
        granted = await settle(task)
        assert granted.lease_id is not None
        assert await lease_ids(storage, "a") == [granted.lease_id]
        await storage.release_lease(granted.lease_id)
        return [(lim.id, lim.name, lim.limit, lim.fencing_token) for lim in granted.limits]

    handed = await waited(storage.release_lease)
    collected = await waited(another_process(storage).release_lease)
    assert [x[1] for x in handed] == ["b", "a", "c"]
    assert [x[:3] for x in collected] == [x[:3] for x in handed]
    # Each grant takes the next token of each limit; each holder of "a" took one too.
    assert [x[3] for x in handed] == [1, 2, 1]
    assert [x[3] for x in collected] == [2, 4, 2]


async def test_a_hand_off_is_delivered_only_once_its_transaction_committed(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """When the grant reaches the waiter, any other connection already sees its lease."""
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db"))
    hand_over = storage.waiters.hand_over
    visible: list[bool] = []

    def check_then_hand_over(waiter_id: str, granted: Granted) -> None:  # the committing thread
        visible.append(_lease_visible_elsewhere(database_url, granted.lease_id))
        hand_over(waiter_id, granted)

    monkeypatch.setattr(storage.waiters, "hand_over", check_then_hand_over)
    await storage.release_lease(holder)
    granted = await settle(task)
    assert visible == [True]
    assert await lease_ids(storage, "db") == [granted.lease_id]


def _lease_visible_elsewhere(database_url: str, lease_id: str | None) -> bool:
    if database_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            return conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is not None
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT 1 FROM leases WHERE id = %s", (lease_id,)).fetchone() is not None


async def test_a_rolled_back_operation_hands_nothing_over(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operation that admits the waiter and then fails (SQLite: its savepoint rolls back
    within the group; PostgreSQL: the transaction rolls back, as before a deadlock retry)
    delivers nothing; the waiter stays queued and the holder keeps its slot."""
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db"))
    deliveries = Deliveries(storage, monkeypatch)

    def release_then_fail(tx: Any) -> None:
        assert storage.scripts.slots.end_lease(tx, holder)
        raise RuntimeError("after admitting")

    with pytest.raises(RuntimeError, match="after admitting"):
        await storage.backend.run(release_then_fail)
    for _ in range(20):  # a delivery would come within a loop iteration or two
        await asyncio.sleep(0)
    assert deliveries.seen == []
    assert not task.done()
    assert await lease_ids(storage, "db") == [holder]
    assert await queued_count(storage) == 1
    await storage.release_lease(holder)
    assert (await settle(task)).lease_id is not None
    assert len(deliveries.seen) == 1


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_retried_transaction_hands_over_once(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL retries a transaction that hit a deadlock (SQLite has none): the attempt that
    rolled back delivers nothing, the one that committed delivers its grant, once."""
    from psycopg import errors as pg_errors

    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db"))
    deliveries = Deliveries(storage, monkeypatch)
    attempts = 0

    def release_deadlocked_once(tx: Any) -> bool:
        nonlocal attempts
        attempts += 1
        ended = storage.scripts.slots.end_lease(tx, holder)
        if attempts == 1:
            raise pg_errors.DeadlockDetected("as if")
        return ended

    assert await storage.backend.run(release_deadlocked_once)
    granted = await settle(task)
    assert attempts == 2
    assert deliveries.seen == [(deliveries.seen[0][0], granted)]
    assert await lease_ids(storage, "db") == [granted.lease_id]


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_admission_skips_a_waiter_settled_while_it_waited_for_the_locks(
    storage: Storage, clock: FakeClock, database_url: str
) -> None:
    """PostgreSQL: admission reads the queue, then waits for the limit locks. A transaction that
    held them meanwhile and refused the waiter (or granted it) committed first: admission must
    see that once it has the locks, and not grant the waiter the slot that transaction freed."""
    import psycopg

    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db", wait=0.5))
    (waiter_id, _), *_ = await waiter_rows(storage)
    with psycopg.connect(database_url) as other:  # another process, half-way through its work
        other.execute("SELECT id FROM limits WHERE name = 'db' FOR UPDATE")
        other.execute("DELETE FROM leases WHERE id = %s", (holder,))
        other.execute("UPDATE waiters SET refused = 'as if' WHERE id = %s", (waiter_id,))
        other.execute("DELETE FROM waiter_limits WHERE waiter_id = %s", (waiter_id,))
        sweeping = asyncio.create_task(another_process(storage).sweep_waiters())

        async def sweep_blocked() -> bool:  # it has read the queue and waits for the lock
            with psycopg.connect(database_url) as watcher:
                row = watcher.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()
            return row is not None and row[0] > 0

        await until(sweep_blocked, "the sweep waits for the lock")
        other.commit()
    await settle(sweeping)
    assert await lease_ids(storage, "db") == []
    with pytest.raises(InvalidRequest, match="as if"):  # read from its row at its deadline
        await settle(task)


async def test_cancelled_once_handed_its_grant_but_before_returning_releases_it(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    first = await arrive(storage, clock, wanting("db"))
    second = await arrive(storage, clock, wanting("db"))
    deliveries = Deliveries(storage, monkeypatch)
    deliveries.then = first.cancel  # the grant is in its hands, and it has not run since
    await storage.release_lease(holder)
    assert isinstance(await outcome(first), asyncio.CancelledError)
    granted = await settle(second)  # the released slot went on to the next in line
    assert await lease_ids(storage, "db") == [granted.lease_id]
    assert await released_events(storage) == 2  # the holder's, then the one nobody took
    assert await waiter_rows(storage) == []


@pytest.mark.parametrize("how", ["cancelled", "timed-out"])
async def test_a_grant_handed_to_a_request_that_left_is_released(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The hand-off arrives after its request left (cancelled, or out of time): the lease is
    released on arrival (with its events), and the next waiter admitted."""
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    first = await arrive(storage, clock, wanting("db", wait=1.0 if how == "timed-out" else FOREVER))
    second = await arrive(storage, clock, wanting("db"))
    deliveries = Deliveries(storage, monkeypatch, hold=True)
    await storage.release_lease(holder)
    await asyncio.wait_for(deliveries.arrived.wait(), 30)
    assert len(await waiter_rows(storage)) == 1  # the first left the queue as it was admitted
    if how == "cancelled":
        first.cancel()
        assert isinstance(await outcome(first), asyncio.CancelledError)
    else:
        # Its row is gone and its grant not here yet: it ends at its deadline, holding nothing.
        assert isinstance(await outcome(first), SlotsUnavailable)
    deliveries.release()
    granted = await settle(second)
    assert await lease_ids(storage, "db") == [granted.lease_id]
    assert await released_events(storage) == 2
    assert await waiter_rows(storage) == []


async def test_a_handed_over_grant_is_left_alone_by_the_sweeper(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    task = await arrive(storage, clock, wanting("db", duration=600))
    await storage.release_lease(holder)
    granted = await settle(task)
    clock.advance(storage_waiting.WAITER_STALE_SECONDS + 1)
    assert await storage.sweep_waiters() == 0
    assert await lease_ids(storage, "db") == [granted.lease_id]


# --- through the API ---------------------------------------------------------------------------------


async def post_wait(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"{V2}/increment-with-lease", json=body)


async def test_api_waiting_request_is_answered_when_a_slot_frees(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    await client.post(f"{V2}/", json={"name": "db", "limit": 1})
    first = (await post_wait(client, {"names": ["db"], "slots": 1})).json()
    waiting = asyncio.create_task(post_wait(client, {"names": ["db"], "slots": 1, "wait_seconds": 60}))
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    # No barging: a polling (Prefect) request is refused while someone waits.
    refused = await post_wait(client, {"names": ["db"], "slots": 1})
    assert refused.status_code == 423 and float(refused.headers["Retry-After"]) > 0
    await client.post(f"{V2}/decrement-with-lease", json={"lease_id": first["lease_id"]})
    answer = await settle(waiting)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    (lim,) = body["limits"]  # the grant after a wait names its limits
    assert (lim["name"], lim["limit"], lim["fencing_token"]) == (
        "db",
        1,
        first["limits"][0]["fencing_token"] + 1,
    )
    assert [x["lease_id"] for x in (await client.get(f"{V2}/db/leases")).json()] == [body["lease_id"]]


async def test_api_polling_request_is_refused_although_a_slot_is_free(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    await client.post(f"{V2}/", json={"name": "db", "limit": 2})
    await post_wait(client, {"names": ["db"], "slots": 1})
    big = asyncio.create_task(post_wait(client, {"names": ["db"], "slots": 2, "wait_seconds": 60}))
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    assert (await client.get(f"{V2}/db")).json()["active_slots"] == 1
    refused = await post_wait(client, {"names": ["db"], "slots": 1})
    assert refused.status_code == 423
    assert refused.json() == {"detail": "Locked", "code": "slots_unavailable"}
    assert "Retry-After" in refused.headers
    big.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await big


async def test_api_wait_times_out_with_423(client: httpx.AsyncClient) -> None:
    await client.post(f"{V2}/", json={"name": "db", "limit": 1})
    await post_wait(client, {"names": ["db"], "slots": 1})
    answer = await post_wait(client, {"names": ["db"], "slots": 1, "wait_seconds": 0.05})
    assert answer.status_code == 423
    assert answer.json() == {
        "detail": "Timed out after waiting 0.05 s for slots",
        "code": "slots_unavailable",
    }
    assert float(answer.headers["Retry-After"]) > 0


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"names": ["nope"], "wait_seconds": 5}, 422, "Cannot wait for limits that do not exist: 'nope'"),
        (
            {"names": ["off"], "wait_seconds": 5},
            422,
            "Cannot wait for inactive limits (they never block): 'off'",
        ),
        (
            {"names": ["rate"], "mode": "rate_limit", "wait_seconds": 5},
            422,
            "wait_seconds applies to mode 'concurrency'",
        ),
        ({"names": ["db"], "wait_seconds": 0}, 422, "wait_seconds: Input should be greater than 0"),
        ({"names": ["db"], "wait_seconds": -1}, 422, "wait_seconds: Input should be greater than 0"),
        (
            {"names": ["db"], "wait_seconds": 3600.5},
            422,
            "wait_seconds: Input should be less than or equal to 3600",
        ),
        (
            {"names": ["db"], "wait_seconds": 5, "priority": 1001},
            422,
            "priority: Input should be less than or equal to 1000",
        ),
        (
            {"names": ["db"], "wait_seconds": 5, "priority": -1001},
            422,
            "priority: Input should be greater than or equal to -1000",
        ),
        ({"names": ["db"], "slots": 2, "wait_seconds": 5}, 422, "Slots requested is greater than the limit"),
    ],
    ids=[
        "unknown",
        "inactive",
        "rate-limit",
        "zero",
        "negative",
        "above-max",
        "priority-high",
        "priority-low",
        "too-many",
    ],
)
async def test_api_what_cannot_be_waited_for_is_422(
    client: httpx.AsyncClient, storage: Storage, body: dict[str, Any], status: int, detail: str
) -> None:
    await client.post(f"{V2}/", json={"name": "db", "limit": 1})
    await client.post(f"{V2}/", json={"name": "off", "limit": 1, "active": False})
    await client.post(f"{V2}/", json={"name": "rate", "limit": 1, "slot_decay_per_second": 1.0})
    answer = await post_wait(client, {"slots": 1, **body})
    assert answer.status_code == status, answer.text
    payload = answer.json()
    if "detail" in payload:
        assert payload["detail"].startswith(detail)
    else:
        messages = [
            f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in payload["exception_detail"]
        ]
        assert any(m.startswith(detail) for m in messages), messages
    assert await waiter_rows(storage) == []


@pytest.mark.parametrize(
    ("names", "delete"),
    [
        (["a"], f"{V2}/a"),
        (["a", "b"], f"{V2}/a"),
        (["tag:a", "b"], "/concurrency_limits/tag/a"),  # a tag limit deleted through the v1 API
    ],
    ids=["its-only-limit", "one-of-its-limits", "v1-tag"],
)
async def test_api_a_waiting_request_whose_limit_is_deleted_is_422(
    client: httpx.AsyncClient, storage: Storage, names: list[str], delete: str
) -> None:
    await client.post(f"{V2}/", json={"name": names[0], "limit": 1})
    await client.post(f"{V2}/", json={"name": "b", "limit": 1})
    await post_wait(client, {"names": names[:1], "slots": 1})
    waiting = asyncio.create_task(post_wait(client, {"names": names, "slots": 1, "wait_seconds": 3600}))
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    assert (await client.delete(delete)).status_code in (200, 204)
    answer = await settle(waiting)
    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "detail": f"Cannot wait for limits that do not exist: {names[0]!r} (deleted while the request waited)",
        "code": "cannot_wait",
    }
    assert await waiter_rows(storage) == []
    assert (await client.get(f"{V2}/b")).json()["active_slots"] == 0


# --- disconnects, with raw ASGI ------------------------------------------------------------------------


@pytest.fixture
async def app(storage: Storage, tmp_path: Path) -> AsyncIterator[FastAPI]:
    application = create_app(Settings(home=tmp_path, reaper_interval_seconds=60.0), storage=storage)
    async with application.router.lifespan_context(application):
        yield application


class Exchange:
    """One raw ASGI request whose disconnect the test triggers (``gone.set()``)."""

    def __init__(self, app: FastAPI, body: dict[str, Any]) -> None:
        self.app = app
        self.body = orjson.dumps(body)
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self._body_sent = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if not self.gone.is_set():  # as uvicorn: what is sent on a lost connection is dropped
            self.sent.append(message)

    async def run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": f"/api{V2}/increment-with-lease",
            "raw_path": f"/api{V2}/increment-with-lease".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(self.body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await self.app(scope, self.receive, self.send)  # type: ignore[arg-type]

    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return int(starts[0]["status"]) if starts else None


async def test_a_client_that_disconnects_while_waiting_holds_nothing(
    app: FastAPI, storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    exchange = Exchange(app, {"names": ["db"], "slots": 1, "wait_seconds": 60})
    request = asyncio.create_task(exchange.run())
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    exchange.gone.set()
    await settle(request)
    assert exchange.status() in (None, 499)
    assert await waiter_rows(storage) == []
    await storage.release_lease(holder)
    assert await lease_ids(storage, "db") == []


@pytest.mark.parametrize("later", range(8))
async def test_a_client_that_disconnects_as_it_is_granted_holds_nothing(
    app: FastAPI, storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, later: int
) -> None:
    """The connection is lost in the loop steps around the grant's completion (``later`` steps
    after it): whichever the route notices first, a grant that cannot reach the client (the
    server drops an answer to a lost connection, as uvicorn does) is released."""
    await make(storage, "db", 1)
    holder = await hold(storage, "db")
    exchange = Exchange(app, {"names": ["db"], "slots": 1, "wait_seconds": 60})
    acquire = storage.acquire
    loop = asyncio.get_running_loop()

    def lose_connection(steps: int) -> None:
        if steps:
            loop.call_soon(lose_connection, steps - 1)
        else:
            exchange.gone.set()

    async def acquire_then_disconnect(request: AcquireRequest) -> Granted:
        try:
            return await acquire(request)
        finally:
            lose_connection(later)

    monkeypatch.setattr(storage, "acquire", acquire_then_disconnect)
    request = asyncio.create_task(exchange.run())
    await until(lambda: _equals(queued_count(storage), 1), "queued")
    await storage.release_lease(holder)
    await settle(request)
    held = await lease_ids(storage, "db")
    if exchange.status() == 200:  # the answer went out before the connection was lost
        assert len(held) == 1
    else:
        assert held == []
