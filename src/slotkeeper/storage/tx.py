"""The open transaction as transaction scripts see it (:class:`Tx`), and what it publishes.

A backend hands every script a :class:`Tx`. Its statement methods differ in two ways only:
whether the script waits for the statement (and so sees its result and its error at once), and
when the rows go in. On SQLite every statement runs at once anyway; on PostgreSQL, whose cost is
round trips, the methods that do not wait let statements travel together (pipeline mode).

==========================  =====================  ==========================================
method                      waits for the answer   use for
==========================  =====================  ==========================================
``one`` / ``all``           yes: rows              a read the script needs now
``all_later``               no: rows taken later   reads that can travel together
``write``                   no                     a write whose outcome nothing looks at
``write_many``              no                     the same statement for many rows
``write_now``               yes: rows changed      a write whose count or error decides
``insert_at_commit``        no: at the commit      rows nothing reads back (server events)
==========================  =====================  ==========================================

A write that does not wait and fails raises at the next statement that waits, or at the commit:
the transaction rolls back either way. Only ``write_now`` raises where the script can handle the
error (a name conflict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slotkeeper.storage.dialect import Dialect, Params, Row

if TYPE_CHECKING:
    from slotkeeper.events.models import EventRecord

log = logging.getLogger("slotkeeper.storage")

#: An in-process delivery to make once a transaction has committed (see ``Tx.handoffs``).
Handoff = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Commit:
    """What one committed transaction (or SQLite group) publishes, in commit order.

    ``handoffs`` never leave the process (they are not in a ``NOTIFY``): the backend runs them
    right after the commit, on the committing thread, with :func:`run_handoffs`; subscribers
    ignore them.
    """

    events: list[EventRecord]
    woken: list[str]
    handoffs: list[Handoff] = field(default_factory=list)


def run_handoffs(handoffs: Iterable[Handoff]) -> None:
    """Run the hand-offs of a committed transaction; one that fails does not stop the others."""
    for handoff in handoffs:
        try:
            handoff()
        except Exception:  # a bug, but the commit stands and the other deliveries must happen
            log.exception("hand-off delivery failed")


class Tx:
    """One open transaction, as the transaction scripts see it (the table in the module doc)."""

    __slots__ = (
        "_cursor",
        "_deferred",
        "_dialect",
        "_pipeline",
        "events",
        "handoffs",
        "integrity_error",
        "outbox",
        "woken",
        "writes",
    )

    def __init__(
        self,
        cursor: Any,
        dialect: Dialect,
        integrity_error: type[Exception],
        pipeline: Any = None,
        *,
        defer: bool = False,
        outbox: bool = False,
    ) -> None:
        self._cursor = cursor
        self._dialect = dialect
        #: PostgreSQL: the connection's pipeline (psycopg), through which every statement goes
        #: without waiting for the previous ones (see :meth:`write`).
        self._pipeline = pipeline
        #: With ``defer`` (the SQLite writer): the rows of :meth:`insert_at_commit`, in write order,
        #: inserted by :meth:`flush` just before the commit. None: inserted at once.
        self._deferred: list[tuple[str, Params]] | None = [] if defer else None
        self.integrity_error = integrity_error
        #: Gateway mode: the server's events also go into the outbox for the upstream
        #: (``rows.write_events``), in this same transaction.
        self.outbox = outbox
        #: Events written in this transaction, in order; published once it commits.
        self.events: list[EventRecord] = []
        #: Waiters granted in this transaction: their requests are woken once it commits.
        self.woken: list[str] = []
        #: Outcomes handed to waiting requests of this process: delivered once it commits, never
        #: if it (or its SQLite savepoint) rolls back.
        self.handoffs: list[Handoff] = []
        #: Statements sent that may have changed something (all but plain SELECTs, and not the
        #: rows deferred to the commit): a PostgreSQL group tells by it whether an operation
        #: that failed left anything to undo.
        self.writes = 0

    # --- reads: the script waits for the rows -------------------------------------------------

    def one(self, query: str, params: Params | None = None) -> Row | None:
        """Run a statement and return its first row, or None."""
        text, reads, lists = self._dialect.prepared(query)
        if not reads:
            self.writes += 1
        self._cursor.execute(text, self._dialect.params(params or {}) if lists else params or {})
        row: Row | None = self._cursor.fetchone()
        return row

    def all(self, query: str, params: Params | None = None) -> list[Row]:
        """Run a statement and return every row."""
        text, reads, lists = self._dialect.prepared(query)
        if not reads:
            self.writes += 1
        self._cursor.execute(text, self._dialect.params(params or {}) if lists else params or {})
        rows: list[Row] = self._cursor.fetchall()
        return rows

    def all_later(self, query: str, params: Params | None = None) -> Callable[[], list[Row]]:
        """Send a read now and take its rows later: ``rows = tx.all_later(...)``, then ``rows()``.

        On PostgreSQL it travels in the pipeline: it runs after every statement sent before it,
        with its own snapshot, and its rows come back with the first result the script waits for
        after it. Reads that do not need each other's results then cost one round trip, not
        one each. Elsewhere it runs at once.
        """
        if self._pipeline is None:
            rows = self.all(query, params)
            return lambda: rows
        text, reads, lists = self._dialect.prepared(query)
        if not reads:
            self.writes += 1
        cursor = self._later_cursor()
        cursor.execute(text, self._dialect.params(params or {}) if lists else params or {})
        fetch: Callable[[], list[Row]] = cursor.fetchall
        return fetch

    def _later_cursor(self) -> Any:
        """A cursor of its own for a read of :meth:`all_later` (its rows stay there until taken)."""
        return self._cursor.connection.cursor()

    # --- writes ---------------------------------------------------------------------------------

    def write(self, query: str, params: Params | None = None) -> None:
        """Run a statement whose outcome the script does not look at.

        On PostgreSQL it is pipelined: sent at once, and its result read together with the next
        statement that returns something, or with the commit. Statements still run in the order
        the script sends them, so what it reads next sees this write. If it fails, that later
        statement (or the commit) raises and the transaction rolls back: never use it for a
        statement whose failure the script handles (use :meth:`write_now`).
        """
        self.writes += 1
        text, _, lists = self._dialect.prepared(query)
        self._cursor.execute(text, self._dialect.params(params or {}) if lists else params or {})

    def write_many(self, query: str, rows: Iterable[Params]) -> None:
        """Run one statement for each parameter set; pipelined on PostgreSQL (see :meth:`write`)."""
        self.writes += 1
        text, _, lists = self._dialect.prepared(query)
        params = [self._dialect.params(r) for r in rows] if lists else list(rows)
        if len(params) == 1:  # most writes are of one limit: ``execute`` costs less for one row
            self._cursor.execute(text, params[0])
        else:
            self._cursor.executemany(text, params)

    def write_now(self, query: str, params: Params | None = None) -> int:
        """Run a statement and wait for it: return how many rows it changed; its error (such as
        :attr:`integrity_error`) raises here, where the script can handle it."""
        self.writes += 1
        text, _, lists = self._dialect.prepared(query)
        self._cursor.execute(text, self._dialect.params(params or {}) if lists else params or {})
        if self._pipeline is not None:
            self._pipeline.sync()  # the row count comes back with the statement's result
        count: int = self._cursor.rowcount
        return count

    def insert_at_commit(self, query: str, rows: Iterable[Params]) -> None:
        """Insert ``rows`` with ``query`` before this transaction commits.

        Elsewhere they are inserted at once (:meth:`write_many`). On the SQLite writer (``defer``)
        they wait, and :meth:`flush` inserts those of every script of the group together,
        one ``executemany`` per statement, just before the group's COMMIT: outside the
        scripts' savepoints, so the pages they change are not copied to a savepoint journal
        once per script (measured in docs/benchmarks.md, "Cost of events"). A rolled-back
        script's rows go with its savepoint (:meth:`rollback_to`).

        For rows nothing in the group reads back: server-written events. The scripts that write
        them never read the events tables; an event-store operation later in the same group
        (only it reads them) does not see them yet, as if it had run before the scripts that
        wrote them, which is a valid order since none of them had completed. Their ids are
        fresh UUIDv7s, so the insert cannot conflict; if it fails all the same (or the disk is
        full), the whole group fails, as when its COMMIT fails.
        """
        if self._deferred is None:
            self.write_many(query, rows)
        else:
            self._deferred.extend((query, row) for row in rows)

    # --- for the backend ------------------------------------------------------------------------

    def flush(self) -> None:
        """Insert the deferred rows: each statement's rows in one ``executemany``, statements in
        the order of their first row (an event before its related resources). Raises what the
        insert raises; the rows are forgotten either way."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, []
        by_query: dict[str, list[Params]] = {}
        for query, row in deferred:
            by_query.setdefault(query, []).append(row)
        for query, rows in by_query.items():
            self.write_many(query, rows)

    def discard(self) -> None:
        """Forget the deferred rows (the transaction is rolled back)."""
        if self._deferred:
            self._deferred = []

    def committed(self) -> Commit | None:
        """What this transaction published, and forget it (None if nothing)."""
        if not self.events and not self.woken and not self.handoffs:
            return None
        commit = Commit(self.events, self.woken, self.handoffs)
        self.events, self.woken, self.handoffs = [], [], []
        return commit

    def mark(self) -> tuple[int, int, int, int]:
        """A point to roll the publications back to (see :meth:`rollback_to`)."""
        deferred = len(self._deferred) if self._deferred is not None else 0
        return len(self.events), len(self.woken), len(self.handoffs), deferred

    def rollback_to(self, mark: tuple[int, int, int, int]) -> None:
        """Forget what was published, and the rows deferred, after ``mark`` (its savepoint was
        rolled back)."""
        del self.events[mark[0] :]
        del self.woken[mark[1] :]
        del self.handoffs[mark[2] :]
        if self._deferred is not None:
            del self._deferred[mark[3] :]
