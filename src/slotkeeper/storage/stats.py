"""Every limit's occupancy and queue, read in one statement: what a metrics scrape reports.

Read at the moment it is asked for, from the database that is the one truth for these numbers
(no counter kept beside it): the same figures in every server process sharing the database. One
``SELECT`` over all limits (10,000 limits: a few tens of ms, see docs/benchmarks.md), on a
reader (SQLite) or a pool connection (PostgreSQL), never on the writer.
"""

from __future__ import annotations

from dataclasses import dataclass

from slotkeeper import domain
from slotkeeper.storage import backend as transactions
from slotkeeper.storage import queries as q
from slotkeeper.storage.core import Storage
from slotkeeper.storage.tx import Tx


@dataclass(frozen=True, slots=True)
class LimitStats:
    """One limit now: its limit, slots held by live leases, slots in its (decayed) pool, the
    requests queued for it, and how busy it is (to rank limits: slots in use plus waiters)."""

    id: str
    name: str
    limit: int
    active: bool
    leased_slots: int
    pool_slots: int
    waiters: int
    busy: int


async def read_limit_stats(storage: Storage) -> list[LimitStats]:
    """Every limit, as it is now (unordered)."""
    now = storage.clock()
    decay = domain.decay_pool

    def read(tx: Tx) -> list[LimitStats]:
        stats = []
        # A plain loop: 10,000 rows cost milliseconds each step of it takes (see the module doc).
        for lid, name, limit, active, pool, clock, rate, leased, waiters in tx.all(
            q.SELECT_LIMIT_STATS, {"now": now}
        ):
            if pool and rate > 0:
                pool = decay(pool, clock, rate, now)[0]
            leased, waiters = int(leased), int(waiters)
            stats.append(
                LimitStats(lid, name, limit, bool(active), leased, pool, waiters, leased + pool + waiters)
            )
        return stats

    return await transactions.read(storage.backend, read)
