"""Read-only views of the limits for operators: the overview of many limits, one limit's holders
and queue, and its recent grants and waits.

:class:`ViewStore` runs over the same backend as :class:`~slotkeeper.storage.Storage`, with its
reads (``Backend.read``: on SQLite a reader thread beside the writer; on PostgreSQL a pool thread)
and without row locks: a view changes nothing, so it never delays an acquisition. Counts come from
the same rows as every decision (the live grants, the stored pool, the queued waiters); a view
reads them at one ``now``, so its leased slots are exactly the holders it lists.

Wait times come from the acquired events: a grant made from the server-side queue carries how
long its request waited there (``payload.waited_seconds``, written by the admitting transaction);
a grant made at once carries nothing and waited 0 s. The statistics are computed by the database
over a limit's events of the window (the ``(resource_id, occurred)`` index bounds the scan), with
exact nearest-rank percentiles.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

from slotkeeper import domain
from slotkeeper.errors import NotFound
from slotkeeper.events import builders
from slotkeeper.models import GrantBucket, LimitState, LimitSummary, QueuedRequest
from slotkeeper.storage import backend as transactions
from slotkeeper.storage import queries as q
from slotkeeper.storage.backend import Backend
from slotkeeper.storage.rows import holder_of, lease_infos, limit_from
from slotkeeper.storage.scripts import LIMIT_NOT_FOUND
from slotkeeper.storage.tx import Tx

__all__ = ["PERCENTILES", "ViewStore"]

#: The wait-time percentiles of :meth:`ViewStore.grant_stats` (nearest rank), as in the SQL.
PERCENTILES = (50, 90, 99)


def _rank(percent: int, count: int) -> int:
    """The nearest rank (1-based) of a percentile among ``count`` sorted values."""
    return max(1, -(-percent * count // 100))


class ViewStore:
    """What an operator sees of the limits, read without locks (see the module's docstring)."""

    def __init__(self, backend: Backend, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock

    @staticmethod
    def _peek(tx: Tx, key: str) -> q.LimitRow:
        if domain.looks_like_uuid(key):
            row = tx.one(q.PEEK_LIMIT_BY_ID, {"key": str(uuid.UUID(key))})
        else:
            row = tx.one(q.PEEK_LIMIT_BY_NAME, {"key": key})
        if row is None:
            raise NotFound(LIMIT_NOT_FOUND)
        return q.LimitRow._make(row)

    async def overview(
        self, limit: int, offset: int, prefix: str = ""
    ) -> tuple[list[LimitSummary], int, float]:
        """A page of limits ordered by name (only names starting with ``prefix``), how many limits
        match in all, and the ``now`` of the read."""

        def op(tx: Tx) -> tuple[list[LimitSummary], int, float]:
            page = tx.all_later(
                q.SELECT_LIMITS_PAGE_WITH_PREFIX, {"prefix": prefix, "limit": limit, "offset": offset}
            )
            counting = tx.all_later(q.COUNT_LIMITS_WITH_PREFIX, {"prefix": prefix})
            rows, total = [q.LimitRow._make(r) for r in page()], int(counting()[0][0])
            now = self.clock()
            ids = [r.id for r in rows]
            if not ids:
                return [], total, now
            leased = tx.all_later(q.SELECT_LEASED_SLOTS, {"ids": ids, "now": now})
            queued = tx.all_later(q.SELECT_QUEUE_SIZES, {"ids": ids})
            sums = {i: int(n) for i, n in leased()}
            sizes = {i: (int(n), int(s)) for i, n, s in queued()}
            summaries = [
                LimitSummary(limit_from(r, sums.get(r.id, 0)), *sizes.get(r.id, (0, 0))) for r in rows
            ]
            return summaries, total, now

        return await transactions.read(self.backend, op)

    async def state(self, key: str, queue_limit: int) -> LimitState:
        """One limit (by id or name): its live leases, the first ``queue_limit`` requests of its
        queue, and how many wait in all. :class:`NotFound` if there is no such limit."""

        def op(tx: Tx) -> LimitState:
            row = self._peek(tx, key)
            now = self.clock()
            leases = tx.all_later(q.SELECT_LIMIT_LEASES, {"id": row.id, "now": now})
            queue = tx.all_later(q.SELECT_QUEUE_OF, {"id": row.id, "limit": queue_limit})
            sizes = tx.all_later(q.SELECT_QUEUE_SIZES, {"ids": [row.id]})
            holders = lease_infos(leases())
            waiting = [
                QueuedRequest(
                    position=i,
                    waiter_id=r[0],
                    priority=r[1],
                    slots=r[2],
                    enqueued=r[3],
                    deadline=r[4],
                    holder=holder_of(r[5], r[6]),
                    limits=int(r[7]),
                )
                for i, r in enumerate(queue(), start=1)
            ]
            size = next(iter(sizes()), None)
            # Leased slots are the sum of the holders listed: the same rows, read once.
            lim = limit_from(row, sum(h.slots for h in holders))
            summary = LimitSummary(lim, int(size[1]) if size else 0, int(size[2]) if size else 0)
            return LimitState(summary, holders, waiting, now)

        return await transactions.read(self.backend, op)

    async def grant_stats(self, key: str, window: float, width: float) -> tuple[str, list[GrantBucket]]:
        """The grants of one limit (v2 and v1 acquisitions) over the last ``window`` seconds, in
        buckets of ``width`` seconds aligned on multiples of ``width`` (the last one is the
        current, partly past); and the limit's id. :class:`NotFound` if there is no such limit."""

        def op(tx: Tx) -> tuple[str, list[GrantBucket]]:
            limit_id = self._peek(tx, key).id
            now = self.clock()
            until = math.floor(now / width) * width + width
            count = max(1, math.ceil(window / width))
            since = until - count * width
            params = {
                "resources": [builders.limit_resource_id(limit_id), builders.v1_limit_resource_id(limit_id)],
                "names": [builders.ACQUIRED, builders.V1_ACQUIRED],
                "since": since,
                "until": until,
                "width": width,
            }
            ranked: dict[int, tuple[int, dict[int, float]]] = {}
            for b, c, n, s in tx.all(q.SELECT_GRANT_STATS[self.backend.name], params):
                ranked.setdefault(int(b), (int(c), {}))[1][int(n)] = float(s)
            buckets = []
            for b in range(count):
                start = since + b * width
                grants, waits = ranked.get(b, (0, {}))
                p50, p90, p99 = (waits.get(_rank(p, grants)) if grants else None for p in PERCENTILES)
                buckets.append(
                    GrantBucket(
                        start=start,
                        seconds=max(0.0, min(width, now - start)),
                        grants=grants,
                        wait_p50=p50,
                        wait_p90=p90,
                        wait_p99=p99,
                        wait_max=waits.get(grants) if grants else None,
                    )
                )
            return limit_id, buckets

        return await transactions.read(self.backend, op)
