"""Slot scripts: acquire, release, renew and expire (see ``scripts.py``).

Leased slots exist only as grant rows: a lease row and its grants are inserted together
(:meth:`SlotScripts.grant`) and deleted together (:meth:`SlotScripts.end_lease`). Unleased slots
(plain ``/increment``, rate limits) go to the limit's pool. Every script that frees slots ends
with admission (``QueueScripts.admit``), in its transaction: freed slots go to the head of the
queue before any newcomer can see them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from slotkeeper import domain
from slotkeeper.domain import Limit, Mode
from slotkeeper.errors import SlotsUnavailable
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import AcquireRequest, Granted, LeaseInfo, LeaseSpec
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Row
from slotkeeper.storage.rows import holder_of, lease_infos, limit_from, limit_rows, slots_params, write_events
from slotkeeper.storage.tx import Tx

if TYPE_CHECKING:
    from slotkeeper.storage.scripts import LockReads, Scripts


class SlotScripts:
    """The slot scripts of one :class:`~slotkeeper.storage.scripts.Scripts`."""

    def __init__(self, scripts: Scripts) -> None:
        self.s = scripts

    # --- taking slots ---------------------------------------------------------------------------

    def acquire(
        self, tx: Tx, request: AcquireRequest, waiter_id: str | None = None, *, reads: LockReads | None = None
    ) -> Granted | None:
        """Take slots on every named limit or none: :class:`SlotsUnavailable` when they are taken
        (or waiters are queued for them). With ``waiter_id`` (a request that waits, with a lease),
        such a request is queued under that id instead, and None returned.

        ``reads``: its locks and reads, if already sent (``send_lock_reads`` of the names)."""
        if reads is None:
            found, now, waiting = self.s.lock_limits_and_queue(tx, request.names)
        else:
            found, now, waiting = self.s.take_lock_reads(tx, reads)
        lease = request.lease
        if request.wait is not None:
            domain.check_waitable(request.names, found, request.mode)
        if not found:
            # Nothing to hold: Prefect still answers with a lease id. It is not stored, since
            # no slot depends on it; renewing it answers 410, releasing it 204.
            return Granted([], str(uuid.uuid4()) if lease else None)
        try:
            decision = domain.decide_acquire(
                found,
                request.slots,
                request.mode,
                leased=lease is not None,
                now=now,
                retry_after=self.s.retry_policy,
                queued=waiting,
            )
        except SlotsUnavailable:
            if waiter_id is None or lease is None or request.wait is None:
                raise
            self.s.queue.enqueue(tx, waiter_id, found, request, lease, now)
            return None
        return self.grant(tx, decision, request.slots, request.mode, lease, now)

    def grant(
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
                domain.evolve(lim, pool_event_id=event.id)
                for lim, event in zip(decision.limits, acquired, strict=True)
            ]
        self.write_acquired(tx, written, acquired, now)
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
            self.write_grants(tx, lease_id, written, decision.grant_slots, acquired)
        return Granted(written, lease_id)

    @staticmethod
    def write_acquired(tx: Tx, written: Sequence[Limit], acquired: Sequence[EventRecord], now: float) -> None:
        """Write the limits of an acquisition (pools, fencing tokens) and its acquired events."""
        tx.write_many(q.UPDATE_LIMIT_SLOTS, [slots_params(lim, now) for lim in written])
        write_events(tx, acquired)

    @staticmethod
    def write_grants(
        tx: Tx,
        lease_id: str,
        written: Sequence[Limit],
        grant_slots: dict[str, int],
        acquired: Sequence[EventRecord],
    ) -> None:
        """One grant row per limit of a lease (inserted after it): its slots and fencing token,
        and the acquired event its released event will follow."""
        tx.write_many(
            q.INSERT_GRANT,
            [
                {
                    "lease_id": lease_id,
                    "limit_id": lim.id,
                    "slots": grant_slots.get(lim.id, 0),
                    "fencing_token": lim.fencing_token,
                    "acquired_event_id": event.id,
                }
                for lim, event in zip(written, acquired, strict=True)
            ],
        )

    # --- giving slots back ----------------------------------------------------------------------

    def release_unleased(
        self, tx: Tx, names: list[str], slots: int, occupancy_seconds: float | None
    ) -> list[Limit]:
        """Plain ``/decrement``: free unleased (pool) slots on each active named limit, clamped
        at 0. Leased slots are not touched: only their lease's end frees them."""
        found, now = self.s.lock_limits_named(tx, names)
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
        tx.write_many(q.UPDATE_LIMIT_SLOTS, [slots_params(new, now) for new, _ in changed])
        tx.write_many(q.UPDATE_LIMIT_AVG, [{"id": new.id, "avg": avg} for new, avg in changed])
        write_events(tx, released)
        self.s.queue.admit(tx, [new.id for new, _ in changed])
        return found

    def send_end_lease(self, tx: Tx, lease_id: str) -> LeaseReads | None:
        """The first half of :meth:`end_lease` (not the reaper's): send its locks, its reads and
        the lease's deletion; wait for nothing. Sent together, so that a release waits for one
        round trip before its writes; they run in this order. The lease row is deleted once its
        limit rows are locked, as always, and the queue of those limits is read before the
        deletion takes the grants along. None on SQLite (``one_writer``): nothing to send ahead,
        :meth:`end_lease` reads what it needs in one statement."""
        if self.s.one_writer:
            return None
        locking = tx.all_later(q.SELECT_LIMITS_OF_LEASE_WITH_GRANTS, {"id": lease_id})
        queue = tx.all_later(q.SELECT_WAITERS_ON_LEASE, {"id": lease_id})
        deleting = tx.all_later(q.DELETE_LEASE, {"id": lease_id})
        return LeaseReads(locking, queue, deleting)

    def end_lease(
        self,
        tx: Tx,
        lease_id: str,
        *,
        expired_only: bool = False,
        cause: str = builders.RELEASE,
        reads: LeaseReads | None = None,
    ) -> bool:
        """End a lease and every slot it holds: released events, the occupancy average, and
        admission on its limits. False if it was already gone (or, ``expired_only``, the
        reaper's case, if it has not expired). ``cause``: who ends it (the released events'
        ``cause``; ``builders.EXPIRY`` for the reaper). ``reads``: what :meth:`send_end_lease`
        sent for it, if it was (PostgreSQL; not with ``expired_only``)."""
        limits: list[Limit]
        grants: dict[str, str | None]
        queue: Callable[[], list[Row]] | None
        deleted: Row | None
        if self.s.one_writer:
            # One transaction at a time (SQLite): the limits, their grants' acquired events and
            # whether anyone is queued on them in one statement; the queue itself only then.
            of_lease = [
                (limit_from(q.LimitRow._make(r[: q.LIMIT_WIDTH]), 0), q.LeaseLimit._make(r[q.LIMIT_WIDTH :]))
                for r in tx.all(q.SELECT_LEASE_LIMITS, {"id": lease_id})
            ]
            limits = [lim for lim, _ in of_lease]
            grants = {lim.id: held.acquired_event_id for lim, held in of_lease}
            queue = (
                tx.all_later(q.SELECT_WAITERS_ON_LEASE, {"id": lease_id})
                if any(held.queued for _, held in of_lease)
                else list
            )
            now = self.s.clock()
            if expired_only:
                deleted = tx.one(q.DELETE_LEASE_IF_EXPIRED, {"id": lease_id, "now": now})
            else:
                deleted = tx.one(q.DELETE_LEASE, {"id": lease_id})
        else:
            if expired_only:
                # The reaper: whether the lease has expired depends on ``now``, read after the locks.
                locking = tx.all_later(q.SELECT_LIMITS_OF_LEASE_WITH_GRANTS, {"id": lease_id})
                queue = tx.all_later(q.SELECT_WAITERS_ON_LEASE, {"id": lease_id})
                locked, grants = _limits_and_grants(locking())
                now = self.s.clock()
                deleted = tx.one(q.DELETE_LEASE_IF_EXPIRED, {"id": lease_id, "now": now})
            else:
                if reads is None:
                    reads = self.send_end_lease(tx, lease_id)
                    assert reads is not None  # not one_writer
                locked = reads.rows()
                now = self.s.clock()
                deleted = reads.deleted()
                grants, queue = reads.grants, (reads.waiting if reads.queue is not None else None)
            limits = [limit_from(r, 0) for r in limit_rows(locked)]
        if deleted is None:
            return False
        ended_lease = q.EndedLeaseRow._make(deleted)
        ended = min(now, ended_lease.expires)  # an expired lease gave its slots back at its expiry
        held = ended - ended_lease.created
        if held > 0:
            limits = [
                domain.evolve(
                    lim,
                    avg_slot_occupancy_seconds=domain.next_avg_occupancy(
                        lim.avg_slot_occupancy_seconds, held, ended_lease.slots, lim.limit
                    ),
                )
                if lim.active
                else lim
                for lim in limits
            ]
            tx.write_many(
                q.UPDATE_LIMIT_AVG,
                [{"id": lim.id, "avg": lim.avg_slot_occupancy_seconds} for lim in limits if lim.active],
            )
        holder = holder_of(ended_lease.holder_type, ended_lease.holder_id)
        batch = [lim.id for lim in limits]
        # ``occurred`` is when the slots came back (the expiry, for a reaped lease); ``received``
        # is when the server recorded it, so it never precedes the event's existence.
        reason = cause if cause in builders.STATED_CAUSES else None
        ended_by = builders.EXPIRY if expired_only else cause
        write_events(
            tx,
            [
                builders.released_event(
                    ended_lease.kind,
                    lim,
                    slots=ended_lease.slots,
                    batch=batch,
                    occurred=ended,
                    holder=holder,
                    follows=grants.get(lim.id),
                    reason=reason,
                    received=now,
                    cause=ended_by,
                )
                for lim in limits
            ],
        )
        self.s.queue.admit(tx, batch, queue, limits)
        return True

    def end_expired(self, tx: Tx, lease_id: str) -> bool:
        """The reaper's :meth:`end_lease`: only if the lease has expired by now."""
        return self.end_lease(tx, lease_id, expired_only=True)

    def expired_lease_ids(self, tx: Tx, batch: int) -> list[str]:
        """Up to ``batch`` leases that have expired, soonest expired first."""
        return [r[0] for r in tx.all(q.SELECT_EXPIRED_LEASES, {"now": self.s.clock(), "batch": batch})]

    # --- keeping slots --------------------------------------------------------------------------

    def renew(self, tx: Tx, lease_id: str, duration: float) -> bool:
        """Extend a live lease to now + duration. False if it expired or is gone."""
        # The limits are locked first and ``now`` read after: an acquisition that already
        # counted this lease as expired has committed, so ``now`` here is past the expiry and
        # the compare-and-set refuses. A lease renewed in time is never reclaimed.
        tx.all(q.SELECT_LIMITS_OF_LEASE, {"id": lease_id})
        now = self.s.clock()
        return tx.write_now(q.RENEW_LEASE, {"id": lease_id, "expires": now + duration, "now": now}) == 1

    def leases_of(self, tx: Tx, key: str) -> list[LeaseInfo]:
        """The live leases on one limit (by id or name), oldest first."""
        lim, now = self.s.lock_limit(tx, key)
        return lease_infos(tx.all(q.SELECT_LIMIT_LEASES, {"id": lim.id, "now": now}))


class LeaseReads:
    """What :meth:`SlotScripts.send_end_lease` sent for one lease, rows not yet taken.

    ``locked_ids``, ``refresh`` and ``admits`` are for a PostgreSQL group that sent the reads of
    several operations together (``postgres.py``, "batched reads")."""

    __slots__ = ("_deleted", "_joined", "_rows", "_waiting", "deleting", "grants", "locking", "queue")

    def __init__(
        self,
        locking: Callable[[], list[Row]],
        queue: Callable[[], list[Row]] | None,
        deleting: Callable[[], list[Row]],
    ) -> None:
        #: ``SELECT_LIMITS_OF_LEASE_WITH_GRANTS``; once refreshed, ``SELECT_LIMITS_BY_IDS``.
        self.locking, self.queue, self.deleting = locking, queue, deleting
        self._joined = True  # ``locking`` returns the grants too
        self._rows: list[Row] | None = None
        self._deleted: list[Row] | None = None
        self._waiting: list[Row] | None = None
        #: The acquired event of the lease's grant on each of its limits (by limit id), once read.
        self.grants: dict[str, str | None] = {}

    def rows(self) -> list[Row]:
        """The lease's limit rows, locked (waits for them the first time)."""
        if self._rows is None:
            if self._joined:
                self._rows, self.grants = _limits_and_grants(self.locking())
            else:
                self._rows = self.locking()
        return self._rows

    def deleted(self) -> Row | None:
        """The deleted lease's row, or None if it was already gone."""
        if self._deleted is None:
            self._deleted = self.deleting()
        return next(iter(self._deleted), None)

    def waiting(self) -> list[Row]:
        """The queue of the lease's limits, read before the deletion (``SELECT_WAITERS_ON``)."""
        if self._waiting is None:
            self._waiting = self.queue() if self.queue is not None else []
        return self._waiting

    def locked_ids(self) -> set[str]:
        """The ids of the limits these reads locked."""
        return {row[0] for row in self.rows()}

    def admits(self) -> bool:
        """Whether ending the lease may admit waiters (its limits have a queue, or it is unknown
        because the reads were sent again): admission may lock and change other limits."""
        return self.queue is None or bool(self.waiting())

    def refresh(self, tx: Tx) -> None:
        """Read the lease's limits again, after an earlier operation of the group changed them
        (they are locked already). The lease and its grants are this operation's alone and
        were deleted by its first half: the queue is read again by admission (by limit ids)."""
        ids = sorted(self.locked_ids())  # and the grants, read with the limits the first time
        self.locking = tx.all_later(q.SELECT_LIMITS_BY_IDS, {"ids": ids}) if ids else (lambda: [])
        self._joined = False
        self._rows = None
        self.queue = None


def _limits_and_grants(rows: list[Row]) -> tuple[list[Row], dict[str, str | None]]:
    """The rows of ``SELECT_LIMITS_OF_LEASE_WITH_GRANTS`` split: the limit rows, and the acquired
    event of the lease's grant on each of those limits (by limit id)."""
    return [row[: q.LIMIT_WIDTH] for row in rows], {row[0]: row[q.LIMIT_WIDTH] for row in rows}
