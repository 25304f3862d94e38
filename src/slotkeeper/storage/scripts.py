"""The transaction scripts: every state change is one function of an open :class:`Tx`.

A script locks what it needs, reads ``now``, asks :mod:`slotkeeper.domain` what to do, and
writes the result; the slot change, the lease rows and the event rows commit together or not at
all (the backend runs the script in one transaction, see ``backend.py``). Events a script writes
also go on ``tx.events``, published after the commit in commit order; an outcome for a waiting
request of this process goes on ``tx.handoffs``, run after the commit too.

:class:`Scripts` holds what every script needs (the clock, the Retry-After policy, the waiting
requests of this process) and the locking lookups they share; the scripts themselves are grouped
by what they change:

* ``scripts.limits`` (:mod:`~slotkeeper.storage.limits`): create, read, list, update, delete;
* ``scripts.slots`` (:mod:`~slotkeeper.storage.slots`): acquire, release, renew, expire;
* ``scripts.queue`` (:mod:`~slotkeeper.storage.queue`): the wait queue: enqueue, admit, end a wait.

Lock order, the same in every script so PostgreSQL never deadlocks: limit rows first, by id
(``ORDER BY id FOR UPDATE``), then lease rows. Every lookup that locks says so in its name
(``lock_...``). ``now`` is read after the locks are held, so two scripts on the same limit see
increasing times in commit order (this is what makes renewal and expiry race-free: see
``SlotScripts.renew``).

A backend that can do better than the statements of a script (one round trip for a whole
operation, say) replaces that script's method; the scripts' signatures are the contract.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from slotkeeper import domain
from slotkeeper.domain import Limit, RetryPolicy
from slotkeeper.errors import NotFound
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Row
from slotkeeper.storage.limits import LimitScripts
from slotkeeper.storage.queue import QueueScripts
from slotkeeper.storage.rows import limit_from, limit_rows
from slotkeeper.storage.slots import SlotScripts
from slotkeeper.storage.tx import Tx
from slotkeeper.storage.waiting import Waiters

LIMIT_NOT_FOUND = "Concurrency Limit not found"
#: How far past the moment it is sent the leased-slots read that travels with the limit locks
#: looks (``SELECT_LEASED_SLOTS_NEAR_BY_NAMES``): a wait for the locks longer than this costs one
#: more round trip, to read the sums again.
LEASED_HORIZON_SECONDS = 1.0


def leased_at(rows: Sequence[Row], now: float) -> dict[str, int]:
    """The slots live leases hold at ``now`` on each limit, from the rows of
    ``SELECT_LEASED_SLOTS_NEAR_BY_NAMES`` (``now`` between its ``since`` and ``horizon``)."""
    sums: dict[str, int] = {}
    for limit_id, expires, slots in rows:
        if expires is None or expires > now:
            sums[limit_id] = sums.get(limit_id, 0) + int(slots)
    return sums


class LockReads:
    """The reads :meth:`Scripts.send_lock_reads` sent for some limit names, rows not yet taken.

    ``locked_ids`` and ``refresh`` are for a PostgreSQL group that sent the reads of several
    operations together (``postgres.py``): which limits these reads lock, and sending them again
    when an earlier operation of the group changed those limits after they ran.
    """

    __slots__ = ("_rows", "locking", "names", "near", "queue", "queued", "scripts", "since")

    def __init__(
        self,
        scripts: Scripts,
        names: list[str],
        queue: bool,
        locking: Callable[[], list[Row]] | None = None,
        queued: Callable[[], list[Row]] | None = None,
        near: Callable[[], list[Row]] | None = None,
        since: float = 0.0,
    ) -> None:
        self.scripts, self.names, self.queue = scripts, names, queue
        self.locking, self.queued, self.near, self.since = locking, queued, near, since
        self._rows: list[Row] | None = None

    def rows(self) -> list[Row]:
        """The locked limit rows (waits for them the first time)."""
        if self._rows is None:
            self._rows = self.locking() if self.locking is not None else []
        return self._rows

    def locked_ids(self) -> set[str]:
        """The ids of the limits these reads locked."""
        return {row[0] for row in self.rows()}

    @staticmethod
    def admits() -> bool:
        """An acquisition admits no waiter: it changes no limit but those it locked."""
        return False

    def refresh(self, tx: Tx) -> None:
        """Send the reads again (the locks are held already: they see every earlier write)."""
        again = self.scripts.send_lock_reads(tx, self.names, queue=self.queue)
        assert again is not None, "only a backend that batches reads (not one_writer) refreshes them"
        self.locking, self.queued, self.near, self.since = (
            again.locking,
            again.queued,
            again.near,
            again.since,
        )
        self._rows = None


class Scripts:
    """Every transaction script, over one clock, one Retry-After policy and one process's waiters.

    ``one_writer``: the backend runs one transaction at a time (SQLite), so nothing changes
    between two statements of a script; PostgreSQL runs many, and admission must then read again
    what other transactions may have changed while it waited for locks.
    """

    def __init__(
        self,
        waiters: Waiters,
        *,
        clock: Callable[[], float] = time.time,
        retry_policy: RetryPolicy | None = None,
        one_writer: bool,
    ) -> None:
        self.clock = clock
        self.retry_policy = retry_policy or RetryPolicy()
        self.waiters = waiters
        self.one_writer = one_writer
        self.limits = LimitScripts(self)
        self.slots = SlotScripts(self)
        self.queue = QueueScripts(self)

    # --- locking lookups ------------------------------------------------------------------------

    def lock_limit(self, tx: Tx, key: str) -> tuple[Limit, float]:
        """The limit with this id or name, locked; and ``now``. Ids are tried for UUID keys;
        :class:`NotFound` if none."""
        if domain.looks_like_uuid(key):  # any spelling of the id: upper case, no dashes, braces
            row = tx.one(q.SELECT_LIMIT_BY_ID, {"key": str(uuid.UUID(key))})
        else:
            row = tx.one(q.SELECT_LIMIT_BY_NAME, {"key": key})
        if row is None:
            raise NotFound(LIMIT_NOT_FOUND)
        now = self.clock()
        return self.with_leased(tx, [row], now)[0], now

    def lock_limits_named(self, tx: Tx, names: Sequence[str]) -> tuple[list[Limit], float]:
        """The named limits that exist, locked, in request order; and ``now``."""
        found, now, _ = self.lock_limits_and_queue(tx, names, queue=False)
        return found, now

    def lock_limits_and_queue(
        self, tx: Tx, names: Sequence[str], *, queue: bool = True
    ) -> tuple[list[Limit], float, dict[str, int]]:
        """:meth:`lock_limits_named`, and with ``queue`` the slots that queued waiters wait for
        on each of them (by limit id), read right behind the locks: one round trip for both."""
        reads = self.send_lock_reads(tx, names, queue=queue)
        if reads is None:
            return self._limit_states(tx, names, queue=queue)
        return self.take_lock_reads(tx, reads)

    def _limit_states(
        self, tx: Tx, names: Sequence[str], *, queue: bool
    ) -> tuple[list[Limit], float, dict[str, int]]:
        """:meth:`lock_limits_and_queue` on SQLite: one transaction at a time, so nothing can
        change between reading ``now`` and the rows, and the limits, their leased sums at ``now``
        and their queues come in one statement (a third of the statements' cost and Python of
        the three reads)."""
        unique = list(dict.fromkeys(names))
        now = self.clock()
        if not unique:
            return [], now, {}
        states = tx.all(q.SELECT_LIMIT_STATES_BY_NAMES, {"names": unique, "now": now})
        by_name: dict[str, Limit] = {}
        queued_slots: dict[str, int] = {}
        for row in states:
            r, state = q.LimitRow._make(row[: q.LIMIT_WIDTH]), q.LimitState._make(row[q.LIMIT_WIDTH :])
            by_name[r.name] = limit_from(r, int(state.leased_slots or 0))
            if state.queued_slots is not None:
                queued_slots[r.id] = state.queued_slots
        return [by_name[n] for n in unique if n in by_name], now, queued_slots if queue else {}

    def send_lock_reads(self, tx: Tx, names: Sequence[str], *, queue: bool = True) -> LockReads | None:
        """The first half of :meth:`lock_limits_and_queue`: send its reads, wait for nothing.

        A PostgreSQL group sends those of several acquisitions before it takes any one's rows
        (``postgres.py``, "batched reads"); :meth:`take_lock_reads` is the second half. None on
        SQLite (``one_writer``): statements cost no round trip there, and the second half reads
        everything in one statement (:meth:`_limit_states`)."""
        if self.one_writer:
            return None
        unique = list(dict.fromkeys(names))
        if not unique:
            return LockReads(self, unique, queue)
        locking = tx.all_later(q.SELECT_LIMITS_BY_NAMES, {"names": unique})
        queued = tx.all_later(q.SELECT_QUEUED_SLOTS_BY_NAMES, {"names": unique}) if queue else None
        since = self.clock()
        near = tx.all_later(
            q.SELECT_LEASED_SLOTS_NEAR_BY_NAMES,
            {"names": unique, "since": since, "horizon": since + LEASED_HORIZON_SECONDS},
        )
        return LockReads(self, unique, queue, locking, queued, near, since)

    def take_lock_reads(self, tx: Tx, reads: LockReads) -> tuple[list[Limit], float, dict[str, int]]:
        """The second half of :meth:`lock_limits_and_queue`: wait for the rows and decide with
        them (the named limits that exist, locked, in request order; ``now``; the queued slots)."""
        if reads.locking is None:
            return [], self.clock(), {}
        rows = reads.rows()
        now = self.clock()
        near = reads.near
        if near is not None and reads.since <= now <= reads.since + LEASED_HORIZON_SECONDS:
            typed = limit_rows(rows)
            sums = leased_at(near(), now)
            limits = [limit_from(r, sums.get(r.id, 0)) for r in typed]
        else:  # the locks took longer than the horizon: read the sums again
            limits = self.with_leased(tx, rows, now)
        by_name = {lim.name: lim for lim in limits}
        found = [by_name[n] for n in reads.names if n in by_name]
        return found, now, dict(reads.queued()) if reads.queued is not None else {}

    # --- reads that count -----------------------------------------------------------------------

    @staticmethod
    def leased_sums(tx: Tx, ids: Sequence[str], now: float) -> dict[str, int]:
        """The slots held by live leases on each of these limits (absent: none)."""
        return {i: int(n) for i, n in tx.all(q.SELECT_LEASED_SLOTS, {"ids": list(ids), "now": now})}

    def with_leased(self, tx: Tx, rows: Sequence[Row], now: float) -> list[Limit]:
        """The limits of these ``limits`` rows, each with the slots its live leases hold now."""
        if not rows:
            return []
        typed = limit_rows(rows)
        sums = self.leased_sums(tx, [r.id for r in typed], now)
        return [limit_from(r, sums.get(r.id, 0)) for r in typed]

    def with_leased_now(self, tx: Tx, limits: Sequence[Limit], now: float) -> dict[str, Limit]:
        """These limits (read earlier in this transaction) by id, with their leased slots now."""
        sums = self.leased_sums(tx, [lim.id for lim in limits], now)
        return {lim.id: domain.evolve(lim, leased_slots=sums.get(lim.id, 0)) for lim in limits}
