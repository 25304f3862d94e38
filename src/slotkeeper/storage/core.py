"""Storage: every state change is one transaction script, run by a backend.

Each public coroutine sends one private ``_op`` to the backend, which runs it inside one
transaction (SQLite: one writer thread with group commit; PostgreSQL: a pool of connections).
An op loads and locks what it needs, asks :mod:`slotkeeper.domain` what to do, and writes the
result; the slot change, the lease rows and the event rows commit together or not at all.
Events an op writes are also appended to ``tx.events``; the backend publishes them to live
subscribers after the commit, in commit order (see ``Backend.subscribe``). A grant for a waiting
request of this process goes on ``tx.handoffs``, which the backend runs after the commit too.

Lock order, the same in every op so PostgreSQL never deadlocks: limit rows first, by id
(``ORDER BY id FOR UPDATE``), then lease rows. ``now`` is read after the locks are held, so two
ops on the same limit see increasing times in commit order (this is what makes renewal and
expiry race-free: see ``_renew``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import orjson

from slotkeeper import domain
from slotkeeper.domain import Limit, Mode, RetryPolicy
from slotkeeper.errors import Conflict, InvalidRequest, NotFound, ShuttingDown, SlotsUnavailable
from slotkeeper.events import builders
from slotkeeper.events.filters import search_text
from slotkeeper.events.models import EventRecord
from slotkeeper.models import (
    AcquireRequest,
    Granted,
    Holder,
    LeaseInfo,
    LeaseSpec,
    LimitSpec,
    LimitView,
)
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Commit, Row, Tx

T = TypeVar("T")

log = logging.getLogger("slotkeeper.storage")

#: How often a process tells the database that its waiting requests are still there.
WAITER_HEARTBEAT_SECONDS = 1.0
#: A waiter not heard of for this long (its process died) leaves the queue.
WAITER_STALE_SECONDS = 5.0

LIMIT_NOT_FOUND = "Concurrency Limit not found"

#: The ``owner`` of a waiter whose request was answered at a shutdown: nobody's, its place kept
#: until its deadline (see :meth:`Storage.detach_waiters`).
DETACHED = "detached"
#: ``Retry-After`` of the answer to a request waiting when its server shuts down.
SHUTDOWN_RETRY_AFTER = 1.0


class Observer(Protocol):
    """Told, in this process, what the committed events do not say (the metrics)."""

    def refused(self, names: Sequence[str]) -> None:
        """An acquisition naming these limits was refused for want of slots (423)."""

    def waited(self, granted: Granted, seconds: float, handoff: float | None) -> None:
        """A waiting request got its grant ``seconds`` after it arrived; ``handoff``: seconds
        from the transaction that admitted it from the queue to now (None: granted at once)."""


class Backend(Protocol):
    """Runs a transaction script: commits its writes if it returns, rolls back if it raises."""

    name: str

    async def run(self, op: Callable[[Tx], T]) -> T: ...

    async def read(self, op: Callable[[Tx], T]) -> T:
        """Run a read-only op, possibly beside the writes (queries that may scan)."""
        ...

    async def close(self) -> None: ...

    def subscribe(self, callback: Callable[[Commit | None], None]) -> Callable[[], None]:
        """Deliver what every transaction published (events, woken waiters), in commit order, to
        ``callback`` (called from any thread).

        Returns a function that stops the delivery.

        ``None`` means publications may have been missed (a lost database connection): live
        subscribers must start again from the store, waiters must look at their rows.
        """

    def observe(self, callback: Callable[[Commit], None]) -> Callable[[], None]:
        """Call ``callback`` with each commit of *this process* that published something, right
        after it committed, on the committing thread; returns a function that stops it.

        Unlike :meth:`subscribe`, never another process's commits: what a process counts from
        here (metrics) sums across processes without counting anything twice.
        """
        ...


def _limit(row: Row, leased: int) -> Limit:
    return Limit(
        id=row[0],
        name=row[1],
        limit=row[2],
        active=bool(row[3]),
        pool_slots=row[4],
        pool_clock=row[5],
        denied_slots=row[6],
        slot_decay_per_second=row[7],
        avg_slot_occupancy_seconds=row[8],
        fencing_token=row[9],
        created=row[10],
        updated=row[11],
        pool_event_id=row[12],
        leased_slots=leased,
    )


def _holder(kind: str | None, ident: str | None) -> Holder | None:
    return Holder(kind, ident) if kind is not None and ident is not None else None


def write_events(tx: Tx, events: Sequence[EventRecord], *, dedupe: bool = False) -> list[EventRecord]:
    """Insert events and their related resources in ``tx``; return those inserted.

    With ``dedupe`` (client events) an id already stored inserts nothing, so each row goes in at
    once. Without (server-written events, fresh UUIDv7 ids), the rows go through
    :meth:`Tx.insert_later`: on SQLite, inserted with those of the whole group just before its
    commit. Inserted events are queued on ``tx.events`` for publication after the commit.
    """
    written: list[EventRecord] = []
    rows = [
        {
            "id": e.id,
            "occurred": e.occurred,
            "received": e.received,
            "event": e.event,
            "resource_id": e.resource_id,
            "resource": orjson.dumps(e.resource).decode(),
            "related": orjson.dumps(e.related).decode(),
            "payload": orjson.dumps(e.payload).decode(),
            "follows": e.follows,
            "search": search_text(e),
        }
        for e in events
    ]
    # Client events go in at once (an id already stored is skipped); the server's are fresh.
    insert = tx.many if dedupe else tx.insert_later
    if dedupe:
        written = [e for e, row in zip(events, rows, strict=True) if tx.one(q.INSERT_EVENT_IF_NEW, row)]
    else:
        insert(q.INSERT_EVENT, rows)
        written = list(events)
    related = [
        {
            "event_id": e.id,
            "position": i,
            "occurred": e.occurred,
            "resource_id": r["prefect.resource.id"],
            "role": r["prefect.resource.role"],
            "labels": orjson.dumps(r).decode(),
        }
        for e in written
        for i, r in enumerate(e.related)
    ]
    if related:
        insert(q.INSERT_EVENT_RESOURCE, related)
    tx.events.extend(written)
    return written


def _limit_params(lim: Limit) -> dict[str, Any]:
    return {
        "id": lim.id,
        "name": lim.name,
        "slot_limit": lim.limit,
        "active": lim.active,
        "created": lim.created,
        "updated": lim.updated,
        "pool_slots": lim.pool_slots,
        "pool_clock": lim.pool_clock,
        "denied_slots": lim.denied_slots,
        "slot_decay_per_second": lim.slot_decay_per_second,
        "avg_slot_occupancy_seconds": lim.avg_slot_occupancy_seconds,
        "fencing_token": lim.fencing_token,
        "pool_event_id": lim.pool_event_id,
    }


def _slots_params(lim: Limit, now: float) -> dict[str, Any]:
    return {
        "id": lim.id,
        "pool_slots": lim.pool_slots,
        "pool_clock": lim.pool_clock,
        "fencing_token": lim.fencing_token,
        "updated": now,
        "pool_event_id": lim.pool_event_id,
    }


def _cannot_wait_for_missing(names: Sequence[str]) -> str:
    return f"Cannot wait for limits that do not exist: {', '.join(map(repr, names))}"


def check_waitable(request: AcquireRequest, found: list[Limit]) -> None:
    """A waiting request must name limits that exist, are active, and count slots.

    Prefect's answer for those (an immediate, empty or uncounted grant) is kept for requests
    that do not wait; one that asks to wait is told why waiting makes no sense.
    """
    missing = sorted(set(request.names) - {lim.name for lim in found})
    if missing:
        raise InvalidRequest(_cannot_wait_for_missing(missing), code="cannot_wait")
    inactive = [lim.name for lim in found if not lim.active]
    if inactive:
        raise InvalidRequest(
            f"Cannot wait for inactive limits (they never block): {', '.join(map(repr, inactive))}",
            code="cannot_wait",
        )
    if request.mode is not Mode.CONCURRENCY:
        raise InvalidRequest(
            "wait_seconds applies to mode 'concurrency'; a rate limit's Retry-After is computed from its decay",
            code="cannot_wait",
        )


def deleted_while_waiting(name: str) -> str:
    """What a waiting request is told (422) when a limit it waits for is deleted: what a new
    request that waits for it would be told (see :func:`check_waitable`), and why."""
    return f"{_cannot_wait_for_missing([name])} (deleted while the request waited)"


#: How a wait ends in a transaction: granted, or refused (a limit it waits for was deleted).
Outcome = Granted | InvalidRequest


class _Wake:
    """Where a waiting request of this process learns that its wait may be over (on the loop).

    ``granted`` is its grant, handed over by the transaction that admitted it once that committed;
    ``refused`` its refusal, handed over the same way by the transaction that deleted a limit it
    waited for. ``event`` is set with either, and also when the request should look at its row (a
    grant or refusal written by another process, or publications that may have been missed).
    ``detached``: the server is shutting down and the waiter's row was detached (see
    :meth:`Storage.detach_waiters`): the request is answered :class:`ShuttingDown`.
    """

    __slots__ = ("detached", "event", "granted", "refused")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.granted: Granted | None = None
        self.refused: InvalidRequest | None = None
        self.detached = False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without a loop
        return None


def _granted(outcome: Outcome) -> Granted:
    """The grant that ends a wait; a refusal is raised."""
    if isinstance(outcome, InvalidRequest):
        raise outcome
    return outcome


async def _to_the_end(sent: asyncio.Future[T]) -> None:
    """Wait until ``sent`` is done, whatever cancellations reach the caller meanwhile."""
    while not sent.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([sent])


class Storage:
    """The one storage interface; the backend decides where the transactions run."""

    def __init__(
        self,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.retry_policy = retry_policy or RetryPolicy()
        #: This process, as the owner of the waiters it queues (see ``_heartbeat``).
        self.owner = str(uuid.uuid4())
        #: The waiting requests of this process, by waiter id: changed on the loop only (``_admit``
        #: looks them up on whichever thread runs the transaction).
        self._wakes: dict[str, _Wake] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        #: Releases of grants that nobody will take (see ``_deliver``).
        self._releasing: set[asyncio.Task[None]] = set()
        #: Told of refusals and waits (metrics), when set.
        self.observer: Observer | None = None
        #: Set by :meth:`detach_waiters`: (Retry-After, how long a detached place is kept).
        self._draining: tuple[float, float] | None = None
        #: Waiters of this process detached at shutdown: never handed a grant in memory again.
        self._detached: set[str] = set()

    @property
    def waiting_requests(self) -> int:
        """Requests of this process waiting in the queue now."""
        return len(self._wakes)

    async def close(self) -> None:
        """Finish pending work and close every connection."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.backend.close()

    # --- reading helpers (run inside ops) -------------------------------------------------------

    @staticmethod
    def _leased_sums(tx: Tx, ids: Sequence[str], now: float) -> dict[str, int]:
        """The slots held by live leases on each of these limits (absent: none)."""
        return {i: int(n) for i, n in tx.all(q.SELECT_LEASED_SLOTS, {"ids": list(ids), "now": now})}

    def _with_leased(self, tx: Tx, rows: Sequence[Row], now: float) -> list[Limit]:
        if not rows:
            return []
        sums = self._leased_sums(tx, [r[0] for r in rows], now)
        return [_limit(r, sums.get(r[0], 0)) for r in rows]

    def _with_leased_now(self, tx: Tx, limits: Sequence[Limit], now: float) -> dict[str, Limit]:
        """These limits (read earlier in this transaction) by id, with their leased slots now."""
        sums = self._leased_sums(tx, [lim.id for lim in limits], now)
        return {lim.id: replace(lim, leased_slots=sums.get(lim.id, 0)) for lim in limits}

    def _find(self, tx: Tx, key: str) -> tuple[Limit, float]:
        """The limit with this id or name, locked; and ``now``. Ids are tried for UUID keys."""
        if domain.looks_like_uuid(key):  # any spelling of the id: upper case, no dashes, braces
            row = tx.one(q.SELECT_LIMIT_BY_ID, {"key": str(uuid.UUID(key))})
        else:
            row = tx.one(q.SELECT_LIMIT_BY_NAME, {"key": key})
        if row is None:
            raise NotFound(LIMIT_NOT_FOUND)
        now = self.clock()
        return self._with_leased(tx, [row], now)[0], now

    def _by_names(self, tx: Tx, names: Sequence[str]) -> tuple[list[Limit], float]:
        """The named limits that exist, locked, in request order; and ``now``."""
        found, now, _ = self._lock_names(tx, names, queue=False)
        return found, now

    def _lock_names(
        self, tx: Tx, names: Sequence[str], *, queue: bool
    ) -> tuple[list[Limit], float, dict[str, int]]:
        """:meth:`_by_names`, and with ``queue`` the slots that queued waiters wait for on each
        of them (by limit id), read right behind the locks: one round trip for both."""
        unique = list(dict.fromkeys(names))
        if not unique:
            return [], self.clock(), {}
        locking = tx.pending(q.SELECT_LIMITS_BY_NAMES, {"names": unique})
        queued = tx.pending(q.SELECT_QUEUED_SLOTS_BY_NAMES, {"names": unique}) if queue else None
        rows = locking()
        now = self.clock()
        by_name = {lim.name: lim for lim in self._with_leased(tx, rows, now)}
        found = [by_name[n] for n in unique if n in by_name]
        return found, now, dict(queued()) if queued is not None else {}

    # --- limits ---------------------------------------------------------------------------------

    async def create_limit(self, spec: LimitSpec) -> LimitView:
        """Create a limit; :class:`Conflict` if the name is taken."""
        return await self.backend.run(lambda tx: self._create(tx, spec))

    def _create(self, tx: Tx, spec: LimitSpec) -> LimitView:
        domain.check_active_slots(spec.active_slots, spec.limit)
        now = self.clock()
        lim = Limit(
            id=str(uuid.uuid4()),
            name=spec.name,
            limit=spec.limit,
            active=spec.active,
            pool_slots=spec.active_slots,
            pool_clock=now,
            leased_slots=0,
            slot_decay_per_second=spec.slot_decay_per_second,
            denied_slots=spec.denied_slots,
            avg_slot_occupancy_seconds=domain.DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS,
            fencing_token=0,
            created=now,
            updated=now,
        )
        try:
            tx.run(q.INSERT_LIMIT, _limit_params(lim))
        except tx.integrity_error:
            raise Conflict(
                f"A concurrency limit named {spec.name!r} already exists.", code="name_taken"
            ) from None
        write_events(tx, [builders.lifecycle_event(builders.CREATED, lim, now)])
        return LimitView(lim, spec.active_slots)

    async def read_limit(self, key: str) -> LimitView:
        """The limit with this id or name; :class:`NotFound` if none."""
        return await self.backend.run(lambda tx: self._read(tx, key))

    def _read(self, tx: Tx, key: str) -> LimitView:
        lim, now = self._find(tx, key)
        return LimitView(lim, lim.occupied(now))

    async def list_limits(self, limit: int, offset: int, prefix: str | None = None) -> list[LimitView]:
        """A page of limits ordered by name, optionally only names starting with ``prefix``."""
        return await self.backend.run(lambda tx: self._list(tx, limit, offset, prefix))

    def _list(self, tx: Tx, limit: int, offset: int, prefix: str | None) -> list[LimitView]:
        if prefix is None:
            rows = tx.all(q.SELECT_LIMITS_PAGE, {"limit": limit, "offset": offset})
        else:
            rows = tx.all(
                q.SELECT_LIMITS_PAGE_WITH_PREFIX, {"prefix": prefix, "limit": limit, "offset": offset}
            )
        now = self.clock()
        return [LimitView(lim, lim.occupied(now)) for lim in self._with_leased(tx, rows, now)]

    async def update_limit(self, key: str, changes: dict[str, Any]) -> LimitView:
        """Apply the given fields; decay up to now is kept, not discarded as Prefect does."""
        return await self.backend.run(lambda tx: self._update(tx, key, changes))

    def _update(self, tx: Tx, key: str, changes: dict[str, Any]) -> LimitView:
        lim, now = self._find(tx, key)
        lim = lim.settled(now)
        fields = {k: v for k, v in changes.items() if k != "active_slots"}
        if "limit" in fields:
            fields["limit"] = int(fields["limit"])
        lim = replace(lim, **fields, updated=now)
        if changes.get("active_slots") is not None:
            lim = domain.set_active_slots(lim, changes["active_slots"], now)
        try:
            tx.run(q.UPDATE_LIMIT, _limit_params(lim))
        except tx.integrity_error:
            raise Conflict(
                f"A concurrency limit named {lim.name!r} already exists.", code="name_taken"
            ) from None
        write_events(tx, [builders.lifecycle_event(builders.UPDATED, lim, now)])
        self._admit(tx, [lim.id])  # a larger or re-activated limit may let waiters in
        return LimitView(lim, lim.occupied(now))

    async def delete_limit(self, key: str) -> LimitView:
        """Delete a limit; its grants go with it (their leases stay for their other limits)."""
        return await self.backend.run(lambda tx: self._delete(tx, key))

    def _take_back(
        self, tx: Tx, lim: Limit, now: float, cause: str = builders.DELETION
    ) -> tuple[list[EventRecord], list[str]]:
        """Everything this limit has out, as it is taken back (deleted, or a v1 reset): the
        released events, and the leases holding a grant on it.

        One released event per grant (a grant whose lease expired but was not reaped yet ended
        at the expiry), and one for unleased slots that would not come back by decay and were
        acquired with an event (slots an operator set have none to follow).
        """
        batches: dict[str, tuple[list[str], Row]] = {}
        for row in tx.all(q.SELECT_LIMIT_GRANTS, {"id": lim.id}):
            batches.setdefault(row[0], ([], row))[0].append(row[5])
        released = [
            replace(
                builders.released_event(
                    row[6],
                    lim,
                    slots=row[1],
                    batch=batch,
                    occurred=min(now, row[7]),
                    holder=_holder(row[3], row[4]),
                    follows=row[2],
                ),
                received=now,
                cause=cause,
            )
            for batch, row in batches.values()
        ]
        pool = lim.settled(now).pool_slots
        if pool and lim.slot_decay_per_second <= 0 and lim.pool_event_id:
            released.append(
                replace(
                    builders.slot_event(
                        builders.RELEASED,
                        lim,
                        slots=pool,
                        batch=[lim.id],
                        occurred=now,
                        follows=lim.pool_event_id,
                    ),
                    cause=cause,
                )
            )
        return released, list(batches)

    def _delete(self, tx: Tx, key: str) -> LimitView:
        lim, now = self._find(tx, key)
        released, leases = self._take_back(tx, lim, now)
        # Its waiters are refused; the queues of the other limits they waited for move on.
        others = [r[0] for r in tx.all(q.SELECT_CO_WAITED_LIMITS, {"id": lim.id})]
        self._refuse_waiters(tx, lim)
        tx.run(q.DELETE_LIMIT_GRANTS, {"id": lim.id})
        if leases:  # a v1 hold of this limit alone can never be released by its task run now
            tx.run(q.DELETE_EMPTY_V1_LEASES, {"ids": leases})
        tx.run(q.DELETE_LIMIT, {"id": lim.id})
        write_events(tx, [*released, builders.lifecycle_event(builders.DELETED, lim, now)])
        self._admit(tx, others)
        return LimitView(lim, lim.occupied(now))

    def _refuse_waiters(self, tx: Tx, lim: Limit) -> None:
        """Every waiter queued for ``lim``, which this transaction deletes, leaves the queue and
        its request is refused (422), as a new request that waits for a limit that does not exist
        is; one that also waits for other limits too, since a grant of fewer limits than asked
        for is not what it waits for.

        A waiter of this process leaves the queue here and its refusal is handed over after the
        commit (``tx.handoffs``), as a grant is; one of another process is marked refused, leaves
        every queue (its limits are forgotten) and is woken, and reads its refusal from its row.
        """
        why = deleted_while_waiting(lim.name)
        for (waiter_id,) in tx.all(q.SELECT_QUEUED_WAITERS_OF, {"id": lim.id}):
            self._end_wait(tx, waiter_id, InvalidRequest(why, code="cannot_wait"))

    def _end_wait(self, tx: Tx, waiter_id: str, outcome: Outcome) -> None:
        """End a queued wait with its grant or refusal, in this transaction.

        A waiter whose request waits in this process leaves the queue, and the outcome goes to
        the request in memory once this transaction commits (``_deliver``), with no transaction
        of its own to collect it. One of another process keeps its row, marked with the outcome
        (a refused one also leaves every queue), is woken (``NOTIFY``) and collects it from there.
        """
        if waiter_id in self._wakes and waiter_id not in self._detached:
            tx.write(q.DELETE_WAITER, {"id": waiter_id})
            tx.handoffs.append(functools.partial(self._hand_over, waiter_id, outcome))
            return
        if isinstance(outcome, Granted):
            tx.write(q.MARK_WAITER_GRANTED, {"id": waiter_id, "lease_id": outcome.lease_id})
        else:
            tx.write(q.MARK_WAITER_REFUSED, {"id": waiter_id, "refused": outcome.detail})
            tx.write(q.DELETE_WAITER_LIMITS, {"id": waiter_id})
        tx.woken.append(waiter_id)

    # --- slots ----------------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> Granted:
        """Take slots on every named limit or none: :class:`SlotsUnavailable` when full.

        With ``request.wait`` (and a lease), a request that cannot be granted now waits in the
        queue of its limits for up to that many seconds. Cancelling the call (a client that
        disconnects) leaves nothing held, whenever it happens: a lease granted by an operation
        that was out at that moment, or handed over to the wait meanwhile, is released, and a
        waiter that was queued leaves the queue.
        """
        try:
            if request.wait is not None and request.lease is not None:
                return await self._acquire_waiting(request)
            granted = await self._answer(self._send(lambda tx: self._acquire(tx, request)))
        except SlotsUnavailable:
            if self.observer is not None:
                self.observer.refused(request.names)
            raise
        assert granted is not None
        return granted

    def _send(self, op: Callable[[Tx], T]) -> asyncio.Future[T]:
        """Hand ``op`` to the backend. It runs to its end even if the caller is cancelled while
        it is out (as the backends do anyway), and what it did can still be read."""
        return asyncio.ensure_future(self.backend.run(op))

    async def _answer(self, sent: asyncio.Future[T]) -> T:
        """The outcome of a sent acquisition (or collection of a wait). If the caller is cancelled
        while it is out, the operation is waited for and a lease it granted is released (its id
        would reach nobody) before the cancellation propagates."""
        try:
            return await asyncio.shield(sent)
        except asyncio.CancelledError:
            await _to_the_end(sent)
            if not sent.cancelled() and sent.exception() is None:
                await self._release(sent.result())
            raise

    async def _release(self, granted: object) -> None:
        """Release a grant that nobody will take (there is nothing to release without a lease,
        nor in a refusal)."""
        if isinstance(granted, Granted) and granted.lease_id is not None:
            await asyncio.shield(self.release_lease(granted.lease_id))

    async def _acquire_waiting(self, request: AcquireRequest) -> Granted:
        started = self.clock()
        granted = await self._wait(request)
        if self.observer is not None:
            now = self.clock()
            handoff = None if granted.admitted is None else max(0.0, now - granted.admitted)
            self.observer.waited(granted, now - started, handoff)
        return granted

    async def _wait(self, request: AcquireRequest) -> Granted:
        if self._draining is not None:  # shutting down: no new wait (a detached one stays so)
            raise ShuttingDown(self._draining[0], request.rejoin)
        loop = asyncio.get_running_loop()
        self._listen(loop)
        waiter_id = request.rejoin or str(uuid.uuid4())
        wake = _Wake()
        if request.rejoin is None:
            # Registered before the request is queued: a grant may come before the queueing returns.
            self._wakes[waiter_id] = wake
        deadline = loop.time() + (request.wait or 0.0)
        queued = False  # a row of this request may be in the queue: leave it on the way out
        try:
            sent: asyncio.Future[Outcome | None]
            if request.rejoin is None:
                sent = self._send(lambda tx: self._acquire(tx, request, waiter_id))
            else:
                sent = self._send(lambda tx: self._rejoin(tx, request, waiter_id))
            try:
                granted = await self._answer(sent)
            except asyncio.CancelledError:  # did the operation out queue the request?
                queued = not sent.cancelled() and sent.exception() is None and sent.result() is None
                raise
            if granted is not None:
                return _granted(granted)
            queued = True
            if request.rejoin is not None:
                # Registered once the row is this process's again: what was granted in between
                # is on the row, so the first pass looks at it.
                self._wakes[waiter_id] = wake
                wake.event.set()
            self._start_heartbeat()
            if self._draining is not None:  # the shutdown began while it was being queued
                await self.detach_waiters(*self._draining)
            while (remaining := deadline - loop.time()) > 0:
                # Not wait_for: it may swallow a cancellation that comes with the wake-up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await wake.event.wait()
                if wake.granted is not None:  # handed over by the transaction that admitted it
                    queued = False
                    return wake.granted
                if wake.refused is not None:  # by the transaction that deleted one of its limits
                    queued = False
                    raise wake.refused
                if wake.detached:  # the server is shutting down: its row keeps its place
                    queued = False
                    raise ShuttingDown((self._draining or (SHUTDOWN_RETRY_AFTER,))[0], waiter_id)
                if not wake.event.is_set():
                    break  # out of time
                # Granted or refused by another process (the row says so), or told to look: look.
                wake.event.clear()
                polled = await self._answer(self._send(lambda tx: self._poll_waiter(tx, waiter_id)))
                if polled is not None:
                    queued = False
                    return _granted(polled)
            # Out of time; a grant (or refusal) that raced the deadline is still taken.
            self._wakes.pop(waiter_id, None)  # a hand-off that arrives from now on is released
            queued = False
            if wake.granted is not None:
                return wake.granted
            if wake.refused is not None:
                raise wake.refused
            if wake.detached:  # detached as its time ran out: it keeps its place all the same
                raise ShuttingDown((self._draining or (SHUTDOWN_RETRY_AFTER,))[0], waiter_id)
            collected = await self._answer(self._send(lambda tx: self._collect(tx, waiter_id, keep=True)))
            if collected is not None:
                return _granted(collected)
            raise SlotsUnavailable(
                self.retry_policy.jitter(1.0), f"Timed out after waiting {request.wait:g} s for slots"
            )
        except asyncio.CancelledError:
            self._wakes.pop(waiter_id, None)  # a hand-off that arrives from now on is released
            await self._release(wake.granted)  # handed over, but the request is gone
            raise
        finally:
            self._wakes.pop(waiter_id, None)
            if queued:  # cancelled or failed while queued: leave the queue, holding nothing
                with contextlib.suppress(SlotsUnavailable):  # gone: collected, or handed over
                    await asyncio.shield(
                        self.backend.run(lambda tx: self._collect(tx, waiter_id, keep=False))
                    )

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._unsubscribe is not None:
            return
        self._loop = loop

        def on_commit(commit: Commit | None) -> None:  # a storage thread
            if commit is None or commit.woken:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._wake, None if commit is None else commit.woken)

        self._unsubscribe = self.backend.subscribe(on_commit)

    def _wake(self, woken: list[str] | None) -> None:
        """Tell these waiters (None: every waiter of this process) to look at their rows."""
        targets = list(self._wakes) if woken is None else woken
        for waiter_id in targets:
            wake = self._wakes.get(waiter_id)
            if wake is not None:
                wake.event.set()

    def _hand_over(self, waiter_id: str, outcome: Outcome) -> None:
        """Deliver a grant (or a refusal) to a waiting request of this process; run by the backend
        once the transaction that admitted (or refused) it has committed, on the committing
        thread: the loop itself (SQLite, delivered at once) or a pool thread (PostgreSQL,
        delivered on the loop)."""
        loop = self._loop
        assert loop is not None  # set before any waiter of this process is registered
        if _running_loop() is loop:
            self._deliver(waiter_id, outcome)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the lease will expire
            loop.call_soon_threadsafe(self._deliver, waiter_id, outcome)

    def _deliver(self, waiter_id: str, outcome: Outcome) -> None:
        wake = self._wakes.get(waiter_id)
        if wake is not None and wake.granted is None and wake.refused is None:
            if isinstance(outcome, Granted):
                wake.granted = outcome
            else:
                wake.refused = outcome
            wake.event.set()
            return
        if not isinstance(outcome, Granted):
            return  # a refusal holds nothing
        granted = outcome
        # The request left (timed out, cancelled) since it was admitted: nobody will ever see
        # this lease, so it is released now (its released events written, the next waiter
        # admitted), not left held until it expires.
        task = asyncio.ensure_future(self._release_quietly(granted))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_quietly(self, granted: Granted) -> None:
        try:
            await self._release(granted)
        except Exception:  # the storage closed, or the database failed: the lease expires
            log.warning("could not release lease %s handed to a request that left", granted.lease_id)

    # --- shutdown: waiters leave, their places stay -----------------------------------------------

    async def detach_waiters(self, retry_after: float = SHUTDOWN_RETRY_AFTER, hold: float = 60.0) -> int:
        """The server is shutting down: answer every request of this process waiting in the queue
        with :class:`ShuttingDown` (503, ``Retry-After``, its waiter id), and every new waiting
        request from now on. Returns how many waiters were detached.

        A detached waiter keeps its row, and so its place in the queue, for ``hold`` seconds,
        owned by nobody (:data:`DETACHED`): admission may grant it meanwhile (the grant waits on
        the row, as for a waiter of another process). A retry that names it (``rejoin``), on any
        process of the database, takes that place back (:meth:`_rejoin`); if none comes, the
        sweeper drops it, and releases what it was granted. Leases are not touched.
        """
        self._draining = (retry_after, hold)
        ids = [i for i, wake in self._wakes.items() if wake.granted is None and wake.refused is None]
        if not ids:
            return 0
        detached = await asyncio.shield(self.backend.run(lambda tx: self._detach(tx, ids, hold)))
        for waiter_id in detached:
            wake = self._wakes.pop(waiter_id, None)
            if wake is not None:
                wake.detached = True
                wake.event.set()
        return len(detached)

    def _detach(self, tx: Tx, ids: list[str], hold: float) -> list[str]:
        # The waiters' limits are locked first, as admission locks them before it grants a
        # waiter: one that chose to hand a grant over in memory has committed (the row is gone,
        # not detached: its request gets the grant), and every later one sees ``_detached`` and
        # marks the row instead.
        limit_ids = sorted({r[1] for r in tx.all(q.SELECT_WAITER_LIMITS, {"ids": ids})})
        if limit_ids:
            tx.all(q.SELECT_LIMITS_BY_IDS, {"ids": limit_ids})
        self._detached.update(ids)
        now = self.clock()
        params = {"ids": ids, "detached": DETACHED, "now": now, "until": now + hold}
        return [r[0] for r in tx.all(q.DETACH_WAITERS, params)]

    def _rejoin(self, tx: Tx, request: AcquireRequest, waiter_id: str) -> Outcome | None:
        """A request that names a waiter detached at a shutdown takes its place back: its grant
        or refusal if one came meanwhile (a grant's lease starts again from now), else the place
        in the queue, now this process's (None). A waiter that is gone (dropped after its hold)
        is queued anew, at the back; one that is not detached is someone else's (409)."""
        row = tx.one(q.SELECT_WAITER_STATE, {"id": waiter_id})
        if row is None:
            return self._acquire(tx, request, waiter_id)
        owner, lease_id, refused, lease_duration = row
        if owner != DETACHED:
            raise Conflict(
                f"Waiter {waiter_id} is waiting already; only a waiter answered 503 at a shutdown may be named"
            )
        if lease_id is None and refused is None:
            now = self.clock()
            wait = request.wait or 0.0
            tx.write(
                q.ATTACH_WAITER, {"id": waiter_id, "owner": self.owner, "now": now, "deadline": now + wait}
            )
            return None
        outcome = self._collect(tx, waiter_id, keep=True)
        if isinstance(outcome, Granted) and outcome.lease_id is not None:
            # Its lease ran while nobody held it: it runs from now, as a grant answered now does.
            now = self._lock_lease_limits(tx, outcome.lease_id)
            renewal = {"id": outcome.lease_id, "expires": now + lease_duration, "now": now}
            if tx.run(q.RENEW_LEASE, renewal) == 0:  # it expired meanwhile: queue again
                return self._acquire(tx, request, waiter_id)
        return outcome

    def _start_heartbeat(self) -> None:
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="slotkeeper-waiters")

    async def _heartbeat(self) -> None:
        """While this process has waiters, tell the database it still holds their requests."""
        while self._wakes:
            await asyncio.sleep(WAITER_HEARTBEAT_SECONDS)
            with contextlib.suppress(Exception):  # the sweeper only acts after several misses
                await self.backend.run(
                    lambda tx: tx.run(q.TOUCH_WAITERS, {"now": self.clock(), "owner": self.owner})
                )

    async def sweep_waiters(self) -> int:
        """Drop waiters whose request is gone (no heartbeat, or far past its deadline), and admit
        what fits on every queued limit (decay frees slots without any release). Returns how
        many waiters were dropped."""

        def abandoned(tx: Tx) -> list[str]:
            now = self.clock()
            late = now - WAITER_STALE_SECONDS
            stale = {"stale": late, "late": late, "detached": DETACHED, "now": now}
            return [r[0] for r in tx.all(q.SELECT_ABANDONED_WAITERS, stale)]

        ids = await self.backend.run(abandoned)
        for waiter_id in ids:
            with contextlib.suppress(SlotsUnavailable):
                await self.backend.run(functools.partial(self._collect, waiter_id=waiter_id, keep=False))
        await self.backend.run(lambda tx: self._admit(tx, [r[0] for r in tx.all(q.SELECT_QUEUED_LIMITS)]))
        return len(ids)

    def _acquire(self, tx: Tx, request: AcquireRequest, waiter_id: str | None = None) -> Granted | None:
        """Grant now, or (with ``waiter_id``) queue the request and return None."""
        found, now, waiting = self._lock_names(tx, request.names, queue=True)
        lease = request.lease
        if request.wait is not None:
            check_waitable(request, found)
        if not found:
            # Nothing to hold: Prefect still answers with a lease id. It is not stored, since
            # no slot depends on it; renewing it answers 410, releasing it 204.
            return Granted([], str(uuid.uuid4()) if lease else None)
        domain.check_request(found, request.slots, request.mode)
        active = {lim.id for lim in found if lim.active}
        queued = {limit_id: slots for limit_id, slots in waiting.items() if limit_id in active}
        try:
            if queued:
                # No barging: slots that free up belong to the queue, so a newcomer, waiting or
                # polling, goes behind it whatever is free right now.
                settled = [lim.settled(now) for lim in found if lim.active]
                raise SlotsUnavailable(self.retry_policy.seconds(settled, request.slots, now, queued))
            decision = domain.decide_acquire(
                found,
                request.slots,
                request.mode,
                leased=lease is not None,
                now=now,
                retry_after=self.retry_policy,
            )
        except SlotsUnavailable:
            if waiter_id is None or lease is None or request.wait is None:
                raise
            self._enqueue(tx, waiter_id, found, request, lease, now)
            return None
        return self._grant(tx, decision, request.slots, request.mode, lease, now)

    def _enqueue(
        self,
        tx: Tx,
        waiter_id: str,
        found: list[Limit],
        request: AcquireRequest,
        lease: LeaseSpec,
        now: float,
    ) -> None:
        holder = lease.holder
        tx.write(
            q.INSERT_WAITER,
            {
                "id": waiter_id,
                "enqueued": now,
                "priority": request.priority,
                "slots": request.slots,
                "lease_duration": lease.duration,
                "holder_type": holder.type if holder else None,
                "holder_id": holder.id if holder else None,
                "deadline": now + (request.wait or 0.0),
                "owner": self.owner,
                "heartbeat": now,
            },
        )
        tx.many(
            q.INSERT_WAITER_LIMIT,
            [{"waiter_id": waiter_id, "limit_id": lim.id, "position": i} for i, lim in enumerate(found)],
        )

    def _grant(
        self,
        tx: Tx,
        decision: domain.Acquisition,
        slots: int,
        mode: Mode,
        lease: LeaseSpec | None,
        now: float,
        waited: float | None = None,
    ) -> Granted:
        """Write a decided acquisition: limits, acquired events, and the lease with its grants.

        ``waited``: how long a grant from the queue waited there (its acquired events say so).
        """
        holder = lease.holder if lease else None
        batch = [lim.id for lim in decision.limits]
        payload = None if waited is None else builders.waited_payload(waited)
        acquired = [
            builders.slot_event(
                builders.ACQUIRED, lim, slots=slots, batch=batch, occurred=now, holder=holder, payload=payload
            )
            for lim in decision.limits
        ]
        written = decision.limits
        if lease is None and mode is Mode.CONCURRENCY:
            # Unleased slots: a later plain decrement's released event follows this one.
            written = [
                replace(lim, pool_event_id=event.id)
                for lim, event in zip(decision.limits, acquired, strict=True)
            ]
        tx.many(q.UPDATE_LIMIT_SLOTS, [_slots_params(lim, now) for lim in written])
        write_events(tx, acquired)
        if lease is None:
            return Granted(written, None)
        lease_id = str(uuid.uuid4())
        tx.write(
            q.INSERT_LEASE,
            {
                "id": lease_id,
                "created": now,
                "expires": now + lease.duration,
                "slots": slots,
                "holder_type": holder.type if holder else None,
                "holder_id": holder.id if holder else None,
            },
        )
        if mode is Mode.CONCURRENCY:
            # Rate-limit slots come back by decay: such a lease holds no grant and releases nothing.
            tx.many(
                q.INSERT_GRANT,
                [
                    {
                        "lease_id": lease_id,
                        "limit_id": lim.id,
                        "slots": decision.grant_slots.get(lim.id, 0),
                        "fencing_token": lim.fencing_token,
                        "acquired_event_id": event.id,
                    }
                    for lim, event in zip(written, acquired, strict=True)
                ],
            )
        return Granted(written, lease_id)

    # --- the wait queue -------------------------------------------------------------------------

    def _admit(
        self,
        tx: Tx,
        limit_ids: Sequence[str],
        waiting: Callable[[], list[Row]] | None = None,
        locked: Sequence[Limit] = (),
    ) -> None:
        """Grant, in queue order, every waiter on these limits that fits now (domain.admit).

        Called at the end of every script that frees slots, in the same transaction: a freed slot
        goes to the head of the queue at once, before any newcomer can see it. A waiter whose
        request waits in this process leaves the queue here and its grant is handed over after
        the commit (``tx.handoffs``); one of another process is marked granted and woken.

        ``waiting``: the queue of exactly these limits (``SELECT_WAITERS_ON``), if the caller
        has already sent the read. ``locked``: limits the caller locked before that read, as they
        are now in this transaction (their leased slots are read again here); when the queue
        needs no other limit, they are not read again.
        """
        ids = set(limit_ids)
        while True:  # the queues of these limits, and of every limit their waiters also name
            if waiting is not None:
                rows, waiting = waiting(), None
            else:
                rows = tx.all(q.SELECT_WAITERS_ON, {"ids": sorted(ids)}) if ids else []
            if not rows:
                return
            needed = ids | {r[7] for r in rows}
            if needed == ids:
                break
            ids = needed
        known = {lim.id: lim for lim in locked}
        if ids <= known.keys():
            # Every lock admission needs was taken before the queue was read: the read saw every
            # grant or refusal of these waiters, which needs one of these locks.
            now = self.clock()
            limits = self._with_leased_now(tx, [known[i] for i in sorted(ids)], now)
        else:
            # Locks taken here may come after the caller's: PostgreSQL may then report a
            # deadlock, which the backend retries (nothing was committed).
            locking = tx.pending(q.SELECT_LIMITS_BY_IDS, {"ids": sorted(ids)})
            # PostgreSQL: the queue was read before all these locks were held, so a waiter that a
            # transaction holding one of them granted or refused meanwhile is no longer queued,
            # and must not be admitted (again). Read behind the locks, in the same round trip.
            # (SQLite's one writer runs one transaction at a time: nothing changed in between.)
            still = (
                tx.pending(q.SELECT_STILL_QUEUED, {"ids": sorted({r[0] for r in rows})})
                if self.backend.name != "sqlite"
                else None
            )
            rows_locked = locking()
            now = self.clock()
            if still is not None:
                queued = {r[0] for r in still()}
                rows = [r for r in rows if r[0] in queued]
            limits = {lim.id: lim for lim in self._with_leased(tx, rows_locked, now)}
        named: dict[str, list[str]] = {}
        info: dict[str, Row] = {}  # in queue order: the rows come ordered
        for r in rows:
            named.setdefault(r[0], []).append(r[7])
            info.setdefault(r[0], r)
        queue = [domain.Waiter(i, tuple(named[i]), r[1], r[2], int(r[3])) for i, r in info.items()]
        for waiter in domain.admit(queue, limits, now):
            found = [limits[i] for i in waiter.limit_ids if i in limits]
            decision = domain.decide_acquire(
                found, waiter.slots, Mode.CONCURRENCY, leased=True, now=now, retry_after=self.retry_policy
            )
            row = info[waiter.id]
            lease = LeaseSpec(row[4], _holder(row[5], row[6]))
            granted = self._grant(
                tx, decision, waiter.slots, Mode.CONCURRENCY, lease, now, waited=now - row[8]
            )
            for lim in granted.limits:
                limits[lim.id] = replace(
                    lim, leased_slots=lim.leased_slots + decision.grant_slots.get(lim.id, 0)
                )
            self._end_wait(tx, waiter.id, replace(granted, admitted=now))

    def _collect(self, tx: Tx, waiter_id: str, *, keep: bool) -> Outcome | None:
        """End a wait. A granted waiter's grant is returned (``keep``) or released; a refused
        waiter's refusal is returned (``keep``); a waiter not granted leaves the queue (and the
        waiters behind it may now be admitted).

        Returns None when the waiter was neither granted nor refused; raises
        :class:`SlotsUnavailable` when the waiter is gone (the sweeper dropped it, or this process
        admitted or refused it: the outcome was handed over in memory, or is released on arrival
        if the request left).
        """
        row = tx.one(q.SELECT_WAITER_LEASE, {"id": waiter_id})
        if row is None:
            raise SlotsUnavailable(None, "The wait was abandoned by the server; try again")
        lease_id, refused = row
        if refused is not None:  # it names no limit any more: nothing to release, no queue moves
            tx.write(q.DELETE_WAITER, {"id": waiter_id})
            return InvalidRequest(refused, code="cannot_wait") if keep else None
        if lease_id is not None and keep:
            created = tx.pending(q.SELECT_LEASE_CREATED, {"id": lease_id})
            tokens: dict[str, int] = dict(tx.all(q.SELECT_LEASE_TOKENS, {"lease_id": lease_id}))
            rows = tx.all(q.SELECT_LIMITS_BY_IDS, {"ids": list(tokens)}) if tokens else []
            by_id = {r[0]: _limit(r, 0) for r in rows}
            order = [r[1] for r in tx.all(q.SELECT_WAITER_LIMITS, {"ids": [waiter_id]})]
            tx.run(q.DELETE_WAITER, {"id": waiter_id})
            limits = [replace(by_id[i], fencing_token=tokens[i]) for i in order if i in by_id]
            admitted = next(iter(created()), (None,))[0]
            return Granted(limits, lease_id, admitted)
        if not keep or lease_id is None:
            limit_ids = [r[1] for r in tx.all(q.SELECT_WAITER_LIMITS, {"ids": [waiter_id]})]
            tx.run(q.DELETE_WAITER, {"id": waiter_id})
            if lease_id is not None:  # granted, but nobody is there to take it: release it
                self._end_lease(tx, lease_id, expired_only=False)
            else:
                self._admit(tx, limit_ids)
        return None

    def _poll_waiter(self, tx: Tx, waiter_id: str) -> Outcome | None:
        """A woken waiter looks at its row: its grant or refusal if another process wrote one,
        else None.

        A row that is gone is not an answer yet: this process admitted (or refused) the waiter
        and the outcome is on its way in memory, or the sweeper dropped it (the wait then ends at
        its deadline).
        """
        row = tx.one(q.SELECT_WAITER_LEASE, {"id": waiter_id})
        if row is None or (row[0] is None and row[1] is None):
            return None
        return self._collect(tx, waiter_id, keep=True)

    async def release_slots(
        self, names: list[str], slots: int, occupancy_seconds: float | None
    ) -> list[Limit]:
        """Plain ``/decrement``: free unleased slots on each active named limit (clamped at 0)."""
        return await self.backend.run(lambda tx: self._release_slots(tx, names, slots, occupancy_seconds))

    def _release_slots(
        self, tx: Tx, names: list[str], slots: int, occupancy_seconds: float | None
    ) -> list[Limit]:
        found, now = self._by_names(tx, names)
        batch = [lim.id for lim in found]
        changed: list[tuple[Limit, float]] = []
        released: list[EventRecord] = []
        for lim in found:
            if not lim.active:
                continue
            new = domain.release_pool(lim, slots, now)
            avg = new.avg_slot_occupancy_seconds
            if occupancy_seconds:
                avg = domain.next_avg_occupancy(avg, occupancy_seconds, slots, new.limit)
            changed.append((new, avg))
            freed = lim.settled(now).pool_slots - new.pool_slots
            # Slots an operator set (active_slots) were never acquired: no event to follow.
            if freed and lim.pool_event_id:
                released.append(
                    builders.slot_event(
                        builders.RELEASED,
                        new,
                        slots=freed,
                        batch=batch,
                        occurred=now,
                        follows=lim.pool_event_id,
                    )
                )
        tx.many(q.UPDATE_LIMIT_SLOTS, [_slots_params(new, now) for new, _ in changed])
        tx.many(q.UPDATE_LIMIT_AVG, [{"id": new.id, "avg": avg} for new, avg in changed])
        write_events(tx, released)
        self._admit(tx, [new.id for new, _ in changed])
        return found

    async def release_lease(self, lease_id: str, *, cause: str = builders.RELEASE) -> bool:
        """Release a lease and every slot it holds. False if it was already gone.

        ``cause``: who ends it (``builders.OPERATOR`` for an operator's action), for the metrics.
        """
        return await self.backend.run(
            lambda tx: self._end_lease(tx, lease_id, expired_only=False, cause=cause)
        )

    def _lock_lease_limits(self, tx: Tx, lease_id: str) -> float:
        """Lock the limits of a lease (by id); return ``now``."""
        tx.all(q.SELECT_LIMITS_OF_LEASE, {"id": lease_id})
        return self.clock()

    def _end_lease(self, tx: Tx, lease_id: str, *, expired_only: bool, cause: str = builders.RELEASE) -> bool:
        # Sent together, so that a release waits for one round trip before its writes; they run
        # in this order. The lease row is deleted once its limit rows are locked, as always, and
        # the queue of those limits is read before the deletion takes the grants along.
        locking = tx.pending(q.SELECT_LIMITS_OF_LEASE, {"id": lease_id})
        acquired = tx.pending(q.SELECT_LEASE_GRANTS, {"id": lease_id})
        queue = tx.pending(q.SELECT_WAITERS_ON_LEASE, {"id": lease_id})
        if expired_only:
            # The reaper: whether the lease has expired depends on ``now``, read after the locks.
            locked = locking()
            now = self.clock()
            row = tx.one(q.DELETE_LEASE_IF_EXPIRED, {"id": lease_id, "now": now})
        else:
            deleting = tx.pending(q.DELETE_LEASE, {"id": lease_id})
            locked = locking()
            now = self.clock()
            row = next(iter(deleting()), None)
        if row is None:
            return False
        limits = [_limit(r, 0) for r in locked]
        grants: dict[str, str] = dict(acquired())
        created, expires, slots, holder_type, holder_id, kind = row
        ended = min(now, expires)  # an expired lease gave its slots back at its expiry
        held = ended - created
        if held > 0:
            limits = [
                replace(
                    lim,
                    avg_slot_occupancy_seconds=domain.next_avg_occupancy(
                        lim.avg_slot_occupancy_seconds, held, slots, lim.limit
                    ),
                )
                if lim.active
                else lim
                for lim in limits
            ]
            tx.many(
                q.UPDATE_LIMIT_AVG,
                [{"id": lim.id, "avg": lim.avg_slot_occupancy_seconds} for lim in limits if lim.active],
            )
        holder = _holder(holder_type, holder_id)
        batch = [lim.id for lim in limits]
        # ``occurred`` is when the slots came back (the expiry, for a reaped lease); ``received``
        # is when the server recorded it, so it never precedes the event's existence.
        write_events(
            tx,
            [
                replace(
                    builders.released_event(
                        kind,
                        lim,
                        slots=slots,
                        batch=batch,
                        occurred=ended,
                        holder=holder,
                        follows=grants.get(lim.id),
                        reason=cause if cause in builders.STATED_CAUSES else None,
                    ),
                    received=now,
                    cause=builders.EXPIRY if expired_only else cause,
                )
                for lim in limits
            ],
        )
        self._admit(tx, batch, queue, limits)
        return True

    async def renew_lease(self, lease_id: str, duration: float) -> bool:
        """Extend a live lease to now + duration. False if it expired or is gone (410)."""
        return await self.backend.run(lambda tx: self._renew(tx, lease_id, duration))

    def _end_expired(self, tx: Tx, lease_id: str) -> bool:
        return self._end_lease(tx, lease_id, expired_only=True)

    def _renew(self, tx: Tx, lease_id: str, duration: float) -> bool:
        # The limits are locked first and ``now`` read after: an acquisition that already
        # counted this lease as expired has committed, so ``now`` here is past the expiry and
        # the compare-and-set refuses. A lease renewed in time is never reclaimed.
        now = self._lock_lease_limits(tx, lease_id)
        return tx.run(q.RENEW_LEASE, {"id": lease_id, "expires": now + duration, "now": now}) == 1

    async def list_leases(self, key: str) -> list[LeaseInfo]:
        """The live leases on one limit, oldest first."""
        return await self.backend.run(lambda tx: self._list_leases(tx, key))

    def _list_leases(self, tx: Tx, key: str) -> list[LeaseInfo]:
        lim, now = self._find(tx, key)
        return [
            LeaseInfo(
                lease_id=r[0],
                holder=Holder(r[1], r[2]) if r[1] is not None else None,
                slots=r[3],
                created=r[4],
                expires=r[5],
                fencing_token=r[6],
            )
            for r in tx.all(q.SELECT_LIMIT_LEASES, {"id": lim.id, "now": now})
        ]

    async def reap_expired(self, batch: int = 500) -> int:
        """End up to ``batch`` expired leases, exactly once each; return how many ended.

        Each lease ends in its own transaction under the usual lock order (SQLite commits them
        together anyway). A lease renewed or released meanwhile is skipped by the conditional
        delete, and a reaper in another process finds nothing left to delete.
        """
        ids = await self.backend.run(
            lambda tx: [r[0] for r in tx.all(q.SELECT_EXPIRED_LEASES, {"now": self.clock(), "batch": batch})]
        )
        ended = await asyncio.gather(
            *(self.backend.run(functools.partial(self._end_expired, lease_id=i)) for i in ids)
        )
        return sum(ended)


__all__ = ["Backend", "Mode", "Storage"]
