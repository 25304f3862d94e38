"""The little that differs between SQLite and PostgreSQL, and the transaction handle ops use."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slotkeeper.events.models import EventRecord

_PARAM = re.compile(r"(?<![:\w]):(\w+)")
_IN_LIST = re.compile(r"IN_LIST\((\w+)\)")

log = logging.getLogger("slotkeeper.storage")

Row = tuple[Any, ...]
#: An in-process delivery to make once a transaction has committed (see ``Tx.handoffs``).
Handoff = Callable[[], None]
#: The fixed statements of queries.py fit many times over; filters compile to open-ended shapes.
_CACHE_SIZE = 1024
#: The parameter values that travel as JSON lists to SQLite.
_SEQUENCES = (list, tuple)
Params = Mapping[str, Any]


@dataclass
class Dialect:
    """How one backend spells the macros of ``queries.py`` and passes list parameters."""

    name: str
    for_update: str
    #: The next place in the waiters' arrival order (see ``schema.waiters``).
    next_waiter_sequence: str
    _cache: dict[str, str] = field(default_factory=dict)

    def sql(self, query: str) -> str:
        """The statement as this backend's driver takes it (cached per statement)."""
        text = self._cache.get(query)
        if text is None:
            text = self._expand(query)
            if len(self._cache) < _CACHE_SIZE:  # statements built per filter shape are not kept
                self._cache[query] = text
        return text

    def _expand(self, query: str) -> str:
        text = query.replace("FOR_UPDATE", self.for_update)
        text = text.replace("NEXT_WAITER_SEQUENCE", self.next_waiter_sequence)
        if self.name == "sqlite":
            return _IN_LIST.sub(r"IN (SELECT value FROM json_each(:\1))", text)
        text = _IN_LIST.sub(r"= ANY(:\1)", text)
        text = text.replace("%", "%%")
        return _PARAM.sub(r"%(\1)s", text)

    def params(self, params: Params) -> Params:
        """List parameters travel as JSON text to SQLite and as arrays to PostgreSQL."""
        if self.name != "sqlite":
            return params
        # Every statement passes here: a loop over a tuple of types costs a third of ``any()``
        # over a generator with ``list | tuple`` (about 2 µs per statement on the reference machine).
        for value in params.values():
            if isinstance(value, _SEQUENCES):
                return {k: json.dumps(v) if isinstance(v, _SEQUENCES) else v for k, v in params.items()}
        return params


#: SQLite's one writer inserts waiters one at a time: the largest plus one. PostgreSQL draws from
#: one sequence, which every server process shares.
SQLITE = Dialect(
    "sqlite", for_update="", next_waiter_sequence="(SELECT COALESCE(MAX(sequence), 0) + 1 FROM waiters)"
)
POSTGRES = Dialect(
    "postgresql", for_update=" FOR UPDATE", next_waiter_sequence="nextval('waiters_sequence_seq')"
)


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
    """One open transaction, as operations in ``core.py`` see it."""

    __slots__ = (
        "_cursor",
        "_deferred",
        "_dialect",
        "_pipeline",
        "events",
        "handoffs",
        "integrity_error",
        "woken",
    )

    def __init__(
        self,
        cursor: Any,
        dialect: Dialect,
        integrity_error: type[Exception],
        pipeline: Any = None,
        *,
        defer: bool = False,
    ) -> None:
        self._cursor = cursor
        self._dialect = dialect
        #: PostgreSQL: the connection's pipeline (psycopg), through which every statement goes
        #: without waiting for the previous ones (see :meth:`write`).
        self._pipeline = pipeline
        #: With ``defer`` (the SQLite writer): the rows of :meth:`insert_later`, in write order,
        #: inserted by :meth:`flush` just before the commit. None: inserted at once.
        self._deferred: list[tuple[str, Params]] | None = [] if defer else None
        self.integrity_error = integrity_error
        #: Events written in this transaction, in order; published once it commits.
        self.events: list[EventRecord] = []
        #: Waiters granted in this transaction: their requests are woken once it commits.
        self.woken: list[str] = []
        #: Grants handed to waiting requests of this process: delivered once it commits, never
        #: if it (or its SQLite savepoint) rolls back.
        self.handoffs: list[Handoff] = []

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

    def insert_later(self, query: str, rows: Iterable[Params]) -> None:
        """Insert ``rows`` with ``query`` before this transaction commits.

        Elsewhere they are inserted at once (:meth:`many`). On the SQLite writer (``defer``)
        they wait, and :meth:`flush` inserts those of every operation of the group together,
        one ``executemany`` per statement, just before the group's COMMIT: outside the
        operations' savepoints, so the pages they change are not copied to a savepoint journal
        once per operation (measured in docs/benchmarks.md, "Cost of events"). A rolled-back
        operation's rows go with its savepoint (:meth:`rollback_to`).

        For rows nothing in the group reads back: server-written events. The scripts that write
        them never read the events tables; an event-store operation later in the same group
        (only it reads them) does not see them yet, as if it had run before the scripts that
        wrote them, which is a valid order since none of them had completed. Their ids are
        fresh UUIDv7s, so the insert cannot conflict; if it fails all the same (or the disk is
        full), the whole group fails, as when its COMMIT fails.
        """
        if self._deferred is None:
            self.many(query, rows)
        else:
            self._deferred.extend((query, row) for row in rows)

    def flush(self) -> None:
        """Insert the deferred rows: each statement's rows in one ``executemany``, statements in
        the order of their first row (an event before its related resources). Raises what the
        insert raises; the rows are forgotten either way."""
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        by_query: dict[str, list[Params]] = {}
        for query, row in pending:
            by_query.setdefault(query, []).append(row)
        for query, rows in by_query.items():
            self.many(query, rows)

    def discard(self) -> None:
        """Forget the deferred rows (the transaction is rolled back)."""
        if self._deferred:
            self._deferred = []

    def one(self, query: str, params: Params | None = None) -> Row | None:
        """Run a statement and return its first row, or None."""
        self._cursor.execute(self._dialect.sql(query), self._dialect.params(params or {}))
        row: Row | None = self._cursor.fetchone()
        return row

    def all(self, query: str, params: Params | None = None) -> list[Row]:
        """Run a statement and return every row."""
        self._cursor.execute(self._dialect.sql(query), self._dialect.params(params or {}))
        rows: list[Row] = self._cursor.fetchall()
        return rows

    def pending(self, query: str, params: Params | None = None) -> Callable[[], list[Row]]:
        """Send a read now and take its rows later: ``rows = tx.pending(...)``, then ``rows()``.

        On PostgreSQL it travels in the pipeline: it runs after every statement sent before it,
        with its own snapshot, and its rows come back with the first result the op waits for
        after it. Reads that do not need each other's results then cost one round trip, not
        one each. Elsewhere it runs at once.
        """
        if self._pipeline is None:
            rows = self.all(query, params)
            return lambda: rows
        cursor = self._cursor.connection.cursor()
        cursor.execute(self._dialect.sql(query), self._dialect.params(params or {}))
        fetch: Callable[[], list[Row]] = cursor.fetchall
        return fetch

    def run(self, query: str, params: Params | None = None) -> int:
        """Run a statement; return how many rows it changed."""
        self._cursor.execute(self._dialect.sql(query), self._dialect.params(params or {}))
        if self._pipeline is not None:
            self._pipeline.sync()  # the row count comes back with the statement's result
        count: int = self._cursor.rowcount
        return count

    def write(self, query: str, params: Params | None = None) -> None:
        """Run a statement whose outcome the op does not look at.

        On PostgreSQL it is pipelined: sent at once, and its result read together with the next
        statement that returns something, or with the commit. Statements still run in the order
        the op sends them, so what it reads next sees this write. If it fails, that later
        statement (or the commit) raises and the transaction rolls back: never use it for a
        statement whose failure the op handles (use :meth:`run`).
        """
        self._cursor.execute(self._dialect.sql(query), self._dialect.params(params or {}))

    def many(self, query: str, rows: Iterable[Params]) -> None:
        """Run one statement for each parameter set; pipelined on PostgreSQL (see :meth:`write`)."""
        self._cursor.executemany(self._dialect.sql(query), [self._dialect.params(r) for r in rows])
