"""Wait-queue scripts: queue a request, admit waiters in queue order, end a wait (see
``scripts.py`` and docs/queue.md).

A waiter is a ``waiters`` row naming its limits (``waiter_limits``). Admission
(:meth:`QueueScripts.admit`) ends every script that frees capacity: it asks
:func:`slotkeeper.domain.admit` which waiters fit, in queue order, and grants them in the same
transaction. How a wait ends depends on where its request waits:

* in this process (``Waiters.waits_here``): the waiter leaves the queue in that transaction and
  the outcome is handed over in memory once it commits (``tx.handoffs``);
* in another process: its row is marked granted (or refused) and its request is woken
  (``tx.woken``, a ``NOTIFY`` on PostgreSQL); the request collects the outcome from its row
  (:meth:`QueueScripts.collect`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from slotkeeper import domain
from slotkeeper.domain import Limit, Mode
from slotkeeper.errors import Conflict, InvalidRequest
from slotkeeper.models import AcquireRequest, Granted, LeaseSpec
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Row
from slotkeeper.storage.rows import holder_of, limit_from, limit_rows
from slotkeeper.storage.tx import Tx
from slotkeeper.storage.waiting import DETACHED, WAITER_STALE_SECONDS, Outcome, WaiterGone

if TYPE_CHECKING:
    from slotkeeper.storage.scripts import Scripts


class QueueScripts:
    """The wait-queue scripts of one :class:`~slotkeeper.storage.scripts.Scripts`."""

    def __init__(self, scripts: Scripts) -> None:
        self.s = scripts

    def enqueue(
        self,
        tx: Tx,
        waiter_id: str,
        found: list[Limit],
        request: AcquireRequest,
        lease: LeaseSpec,
        now: float,
    ) -> None:
        """Queue a request (its limits locked by the caller) as waiter ``waiter_id``."""
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
                "owner": self.s.waiters.owner,
                "heartbeat": now,
            },
        )
        tx.write_many(
            q.INSERT_WAITER_LIMIT,
            [{"waiter_id": waiter_id, "limit_id": lim.id, "position": i} for i, lim in enumerate(found)],
        )

    def admit(
        self,
        tx: Tx,
        limit_ids: Sequence[str],
        waiting: Callable[[], list[Row]] | None = None,
        locked: Sequence[Limit] = (),
    ) -> None:
        """Grant, in queue order, every waiter on these limits that fits now (domain.admit).

        Called at the end of every script that frees slots, in the same transaction: a freed slot
        goes to the head of the queue at once, before any newcomer can see it.

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
            queued = [q.QueuedWaiterRow._make(r) for r in rows]
            needed = ids | {r.limit_id for r in queued}
            if needed == ids:
                break
            ids = needed
        known = {lim.id: lim for lim in locked}
        if ids <= known.keys():
            # Every lock admission needs was taken before the queue was read: the read saw every
            # grant or refusal of these waiters, which needs one of these locks.
            now = self.s.clock()
            limits = self.s.with_leased_now(tx, [known[i] for i in sorted(ids)], now)
        else:
            # Locks taken here may come after the caller's: PostgreSQL may then report a
            # deadlock, which the backend retries (nothing was committed).
            locking = tx.all_later(q.SELECT_LIMITS_BY_IDS, {"ids": sorted(ids)})
            # PostgreSQL: the queue was read before all these locks were held, so a waiter that a
            # transaction holding one of them granted or refused meanwhile is no longer queued,
            # and must not be admitted (again). Read behind the locks, in the same round trip.
            # (SQLite's one writer runs one transaction at a time: nothing changed in between.)
            still = (
                None
                if self.s.one_writer
                else tx.all_later(q.SELECT_STILL_QUEUED, {"ids": sorted({r.id for r in queued})})
            )
            rows_locked = locking()
            now = self.s.clock()
            if still is not None:
                left = {r[0] for r in still()}
                queued = [r for r in queued if r.id in left]
            limits = {lim.id: lim for lim in self.s.with_leased(tx, rows_locked, now)}
        named: dict[str, list[str]] = {}
        first: dict[str, q.QueuedWaiterRow] = {}  # in queue order: the rows come ordered
        for r in queued:
            named.setdefault(r.id, []).append(r.limit_id)
            first.setdefault(r.id, r)
        waiters = [
            domain.Waiter(i, tuple(named[i]), r.slots, r.priority, int(r.sequence)) for i, r in first.items()
        ]
        for waiter in domain.admit(waiters, limits, now):
            found = [limits[i] for i in waiter.limit_ids if i in limits]
            decision = domain.decide_acquire(
                found, waiter.slots, Mode.CONCURRENCY, leased=True, now=now, retry_after=self.s.retry_policy
            )
            r = first[waiter.id]
            lease = LeaseSpec(r.lease_duration, holder_of(r.holder_type, r.holder_id))
            granted = self.s.slots.grant(
                tx, decision, waiter.slots, Mode.CONCURRENCY, lease, now, waited=now - r.enqueued
            )
            for lim in granted.limits:
                limits[lim.id] = domain.evolve(
                    lim, leased_slots=lim.leased_slots + decision.grant_slots.get(lim.id, 0)
                )
            self.settle(tx, waiter.id, replace(granted, admitted=now))

    def refuse_waiters(self, tx: Tx, lim: Limit) -> None:
        """Every waiter queued for ``lim``, which this transaction deletes, leaves the queue and
        its request is refused (422), as a new request that waits for a limit that does not exist
        is; one that also waits for other limits too, since a grant of fewer limits than asked
        for is not what it waits for."""
        why = domain.deleted_while_waiting(lim.name)
        for (waiter_id,) in tx.all(q.SELECT_QUEUED_WAITERS_OF, {"id": lim.id}):
            self.settle(tx, waiter_id, InvalidRequest(why, code="cannot_wait"))

    def settle(self, tx: Tx, waiter_id: str, outcome: Outcome) -> None:
        """End a queued wait with its grant or refusal, in this transaction.

        A waiter whose request waits in this process leaves the queue, and the outcome goes to
        the request in memory once this transaction commits, with no transaction of its own to
        collect it. One of another process keeps its row, marked with the outcome (a refused one
        also leaves every queue), is woken (``NOTIFY``) and collects it from there.
        """
        waiters = self.s.waiters
        if waiters.waits_here(waiter_id):
            tx.write(q.DELETE_WAITER, {"id": waiter_id})
            tx.handoffs.append(functools.partial(waiters.hand_over, waiter_id, outcome))
            return
        if isinstance(outcome, Granted):
            tx.write(q.MARK_WAITER_GRANTED, {"id": waiter_id, "lease_id": outcome.lease_id})
        else:
            tx.write(q.MARK_WAITER_REFUSED, {"id": waiter_id, "refused": outcome.detail})
            tx.write(q.DELETE_WAITER_LIMITS, {"id": waiter_id})
        tx.woken.append(waiter_id)

    # --- a request ends its own wait ------------------------------------------------------------

    def collect(self, tx: Tx, waiter_id: str) -> Outcome | None:
        """A request ends its wait and takes the outcome written on its row: its grant, its
        refusal, or None (it was neither granted nor refused, and leaves the queue: the waiters
        behind it may now be admitted). :class:`WaiterGone` if the row is gone."""
        return self._end(tx, waiter_id, keep=True)

    def abandon(self, tx: Tx, waiter_id: str) -> None:
        """A waiter whose request is gone (cancelled, failed, swept) ends: a grant written on its
        row is released, a queued one leaves the queue. :class:`WaiterGone` if the row is gone."""
        self._end(tx, waiter_id, keep=False)

    def _end(self, tx: Tx, waiter_id: str, *, keep: bool) -> Outcome | None:
        # The waiter's limits are locked before its row is read, as admission locks every limit of
        # a waiter before it grants or refuses it: the row read behind the locks is final. Read
        # first, on PostgreSQL, a grant committed by another connection between that read and the
        # row's deletion was lost with the row: the lease was left held by nobody.
        locking = tx.all_later(q.SELECT_LIMITS_OF_WAITER, {"id": waiter_id})
        reading = tx.all_later(q.SELECT_WAITER_LEASE, {"id": waiter_id})
        limit_ids = [r.id for r in limit_rows(locking())]
        found = reading()
        row = found[0] if found else None
        if row is None:
            # The sweeper dropped it, or this process admitted or refused it: the outcome was
            # handed over in memory, or is released on arrival if the request left.
            raise WaiterGone(waiter_id)
        ended = q.WaiterOutcomeRow._make(row)
        if ended.refused is not None:  # it names no limit any more: nothing to release, no queue moves
            tx.write(q.DELETE_WAITER, {"id": waiter_id})
            return InvalidRequest(ended.refused, code="cannot_wait") if keep else None
        lease_id = ended.lease_id
        if lease_id is not None and keep:
            created = tx.all_later(q.SELECT_LEASE_CREATED, {"id": lease_id})
            tokens: dict[str, int] = dict(tx.all(q.SELECT_LEASE_TOKENS, {"lease_id": lease_id}))
            rows = tx.all(q.SELECT_LIMITS_BY_IDS, {"ids": list(tokens)}) if tokens else []
            by_id = {r.id: limit_from(r, 0) for r in limit_rows(rows)}
            order = [r[1] for r in tx.all(q.SELECT_WAITER_LIMITS, {"ids": [waiter_id]})]
            tx.write_now(q.DELETE_WAITER, {"id": waiter_id})
            limits = [replace(by_id[i], fencing_token=tokens[i]) for i in order if i in by_id]
            admitted = next(iter(created()), (None,))[0]  # when the queue granted it
            return Granted(limits, lease_id, admitted)
        tx.write_now(q.DELETE_WAITER, {"id": waiter_id})
        if lease_id is not None:  # granted, but nobody is there to take it: release it
            self.s.slots.end_lease(tx, lease_id)
        else:
            self.admit(tx, limit_ids)
        return None

    def poll(self, tx: Tx, waiter_id: str) -> Outcome | None:
        """A woken waiter looks at its row: its grant or refusal if another process wrote one
        (collected), else None.

        A row that is gone is not an answer yet: this process admitted (or refused) the waiter
        and the outcome is on its way in memory, or the sweeper dropped it (the wait then ends at
        its deadline).
        """
        row = tx.one(q.SELECT_WAITER_LEASE, {"id": waiter_id})
        if row is None:
            return None
        ended = q.WaiterOutcomeRow._make(row)
        if ended.lease_id is None and ended.refused is None:
            return None
        return self.collect(tx, waiter_id)

    # --- keeping the queue honest ---------------------------------------------------------------

    def touch(self, tx: Tx) -> None:
        """This process still holds the requests of its waiters (their heartbeat)."""
        tx.write_now(q.TOUCH_WAITERS, {"now": self.s.clock(), "owner": self.s.waiters.owner})

    def abandoned(self, tx: Tx) -> list[str]:
        """Waiters whose request is gone: no heartbeat from its process, far past its deadline, or
        detached at a shutdown and not taken back in time."""
        now = self.s.clock()
        late = now - WAITER_STALE_SECONDS
        stale = {"stale": late, "late": late, "detached": DETACHED, "now": now}
        return [r[0] for r in tx.all(q.SELECT_ABANDONED_WAITERS, stale)]

    # --- shutdown: waiters leave, their places stay ---------------------------------------------

    def detach(self, tx: Tx, ids: list[str], hold: float) -> list[str]:
        """These waiters of this process belong to nobody (:data:`DETACHED`) for ``hold`` seconds:
        their requests are answered at a shutdown, their places kept. Returns those still queued.
        """
        # The waiters' limits are locked first, as admission locks them before it grants a
        # waiter: one that chose to hand a grant over in memory has committed (the row is gone,
        # not detached: its request gets the grant), and every later one sees it detached and
        # marks the row instead.
        limit_ids = sorted({r[1] for r in tx.all(q.SELECT_WAITER_LIMITS, {"ids": ids})})
        if limit_ids:
            tx.all(q.SELECT_LIMITS_BY_IDS, {"ids": limit_ids})
        self.s.waiters.detached(ids)
        now = self.s.clock()
        params = {"ids": ids, "detached": DETACHED, "now": now, "until": now + hold}
        return [r[0] for r in tx.all(q.DETACH_WAITERS, params)]

    def rejoin(self, tx: Tx, request: AcquireRequest, waiter_id: str) -> Outcome | None:
        """A request that names a waiter detached at a shutdown takes its place back: its grant
        or refusal if one came meanwhile (a grant's lease starts again from now), else the place
        in the queue, now this process's (None). A waiter that is gone (dropped after its hold)
        is queued anew, at the back; one that is not detached is someone else's (409)."""
        row = tx.one(q.SELECT_WAITER_STATE, {"id": waiter_id})
        if row is None:
            return self.s.slots.acquire(tx, request, waiter_id)
        state = q.WaiterStateRow._make(row)
        if state.owner != DETACHED:
            raise Conflict(
                f"Waiter {waiter_id} is waiting already; only a waiter answered 503 at a shutdown may be named"
            )
        if state.lease_id is None and state.refused is None:
            now = self.s.clock()
            wait = request.wait or 0.0
            tx.write(
                q.ATTACH_WAITER,
                {"id": waiter_id, "owner": self.s.waiters.owner, "now": now, "deadline": now + wait},
            )
            return None
        outcome = self.collect(tx, waiter_id)
        # A grant's lease ran while nobody held it: it runs from now, as a grant answered now does
        # (if it expired meanwhile, the request queues again).
        if (
            isinstance(outcome, Granted)
            and outcome.lease_id is not None
            and not self.s.slots.renew(tx, outcome.lease_id, state.lease_duration)
        ):
            return self.s.slots.acquire(tx, request, waiter_id)
        return outcome

    def admit_everywhere(self, tx: Tx) -> None:
        """Admit what fits on every limit with queued waiters (decay frees slots without any
        script running)."""
        self.admit(tx, [r[0] for r in tx.all(q.SELECT_QUEUED_LIMITS)])
