"""Every limit's occupancy and queue, read in one statement: what a metrics scrape reports.

Read at the moment it is asked for, from the database that is the one truth for these numbers
(no counter kept beside it): the same figures in every server process sharing the database. One
``SELECT`` over all limits (10,000 limits: a few tens of ms, see docs/benchmarks.md), on a
reader (SQLite) or a pool connection (PostgreSQL), never on the writer.
"""

from __future__ import annotations

from dataclasses import dataclass

from slotkeeper import domain
from slotkeeper.storage import queries as q
from slotkeeper.storage.core import Storage
from slotkeeper.storage.dialect import Tx


@dataclass(frozen=True, slots=True)
class LimitStats:
    """One limit now: its limit, slots held by live leases, slots in its (decayed) pool, and the
    requests queued for it."""

    id: str
    name: str
    limit: int
    active: bool
    leased_slots: int
    pool_slots: int
    waiters: int

    @property
    def busy(self) -> int:
        """How busy it is, to rank limits: slots in use plus queued requests."""
        return self.leased_slots + self.pool_slots + self.waiters


async def read_limit_stats(storage: Storage) -> list[LimitStats]:
    """Every limit, as it is now (unordered)."""
    now = storage.clock()

    def read(tx: Tx) -> list[LimitStats]:
        stats = []
        for lid, name, limit, active, pool, clock, rate, leased, waiters in tx.all(
            q.SELECT_LIMIT_STATS, {"now": now}
        ):
            settled, _ = domain.decay_pool(pool, clock, rate, now)
            stats.append(LimitStats(lid, name, limit, bool(active), int(leased), settled, int(waiters)))
        return stats

    return await storage.backend.read(read)
