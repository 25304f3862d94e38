"""The PostgreSQL backend: a pool of connections, one per worker thread, and a listener.

Write operations run in groups (group commit, ``groups.py``): what queues while the lanes are
busy runs as one transaction on one of ``pool_size`` threads, each owning one psycopg connection
(``_attempt_group``); a request alone is a transaction of its own (``_attempt``). Row locks (``SELECT ... ORDER BY id FOR UPDATE``) serialise operations on the
same limits across every thread and every server process sharing the database. A deadlock or
serialisation failure is retried (the transaction was rolled back, so nothing happened twice);
any other error rolls the transaction back and is raised.

A transaction runs in pipeline mode (``_attempt``): statements go out without waiting for the
previous one's answer, and the thread waits only where the op reads a result, so an operation
costs a few round trips, not one per statement (see ARCHITECTURE.md). In a group, the locks and
reads of its acquisitions and releases travel together (``_run_batch``), and ``PgTx`` sends
fewer statements for the same writes.

Live events cross processes through ``NOTIFY``: a transaction that wrote events sends them on the
``slotkeeper_events`` channel before it commits, and PostgreSQL delivers notifications only for
committed transactions and in commit order. Each process LISTENs on one connection and hands
what arrives to its subscribers, its own events included: one path for all. The exception is a
grant handed to a waiting request of this very process (``Tx.handoffs``): it is delivered in
process, right after the commit, and never travels in a notification. A retried attempt starts
from a fresh ``Tx``, so a rolled-back attempt delivers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import errors as pg_errors

from slotkeeper.errors import QueryTimeout, StorageClosed
from slotkeeper.events.models import EventRecord
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import POSTGRES, Params, Row
from slotkeeper.storage.groups import GroupQueue, Op, Outcome, TwoHalves
from slotkeeper.storage.tx import Commit, Tx, run_handoffs
from slotkeeper.supervisor import Supervisor

log = logging.getLogger("slotkeeper.storage.postgres")

CHANNEL = "slotkeeper_events"
#: Queues one notification on the channel (what ``PgTx.send_writes`` sends last).
_NOTIFY = "SELECT pg_notify(%s, %s)"
#: The supervised loop that listens on CHANNEL.
LISTENER = "event listener"
#: NOTIFY payloads must stay under 8000 bytes; larger batches travel as event ids.
_MAX_PAYLOAD = 7000

T = TypeVar("T")

_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
_ATTEMPTS = 5

#: Most operations one group transaction carries: bounds how long a group holds its locks.
MAX_GROUP = 64
#: How long an operation of a group waits for a row lock before the group gives up and runs its
#: operations one by one. Groups hold the locks of their earlier operations while a later one
#: waits, so two groups (of this process or another) can wait for each other although each
#: operation locks in id order; this ends such a wait long before PostgreSQL's deadlock check
#: (``deadlock_timeout``, 1 s by default). Set on the connection (not ``SET LOCAL``: one
#: statement less per group) when it runs a group after running something else, and reset by
#: :data:`ALONE_LOCK_TIMEOUT` when it runs an operation alone after a group: a ``SET`` in a
#: transaction that rolls back is undone with it, so the connection's setting is recorded only
#: once its transaction committed (``grouped``, per pool thread and its connection).
GROUP_LOCK_TIMEOUT = b"SET lock_timeout = '200ms'"
#: An operation alone waits for its locks as long as the server's setting lets it (PostgreSQL's
#: deadlock check ends a cycle).
ALONE_LOCK_TIMEOUT = b"RESET lock_timeout"


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The connection pool of one process (metrics)."""

    size: int
    connections: int
    busy: int
    waiting: int


class PostgresBackend:
    """Runs transaction scripts on a pool of threads, each with its own connection."""

    name = "postgresql"
    #: A lost or refused connection: "the database cannot serve this now", not a bug.
    unavailable: tuple[type[Exception], ...] = (psycopg.OperationalError,)

    def __init__(
        self,
        conninfo: str,
        pool_size: int = 8,
        *,
        events_pool_size: int = 2,
        query_timeout: float = 30.0,
        lanes: int | None = None,
    ) -> None:
        self.conninfo = conninfo
        # Fail at start-up, not at the first request, when the database is unreachable.
        psycopg.connect(conninfo).close()
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(pool_size, thread_name_prefix="slotkeeper-pg")
        self._subscribers: list[Callable[[Commit | None], None]] = []
        self._observers: list[Callable[[Commit], None]] = []
        self.pool_size = pool_size
        #: Operations running alone (reads) handed to the pool and not finished (on the loop).
        self._alone = 0
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        #: Gateway mode: server events also go into the outbox (``Tx.outbox``).
        self.outbox = False
        #: Keeps the listener thread running (restarts it after an unexpected error).
        self.supervisor = Supervisor()
        self._listened = False  # the listener was connected once: a reconnection may miss events
        # Event queries (``scan``): threads and connections of their own, so that however many
        # run and however long, the pool above stays free for acquisitions (issue 11: eight slow
        # event queries held the whole pool and an acquire waited 20.9 s).
        self.events_pool_size = events_pool_size
        #: Seconds an event query may run (``statement_timeout``, set per transaction).
        self.query_timeout = query_timeout
        self._scanners = ThreadPoolExecutor(events_pool_size, thread_name_prefix="slotkeeper-pg-events")
        self._scan_local = threading.local()
        self._scan_connections: list[psycopg.Connection[Any]] = []
        #: Group commit: write operations queue here, and each of ``lanes`` pool connections runs
        #: what queued while it was busy as one transaction (``groups.py``).
        self.groups = GroupQueue(
            self._run_group, self._executor, lanes=lanes or pool_size, max_size=MAX_GROUP
        )

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            # Autocommit: the transaction's BEGIN and COMMIT are sent by ``_attempt`` itself, in
            # the pipeline with its statements (psycopg's own BEGIN would wait for an answer).
            conn = psycopg.connect(self.conninfo, autocommit=True)
            self._local.conn = conn
            self._local.grouped = False  # its lock_timeout is the server's (GROUP_LOCK_TIMEOUT)
            self._local.spare = []  # its cursors for reads taken later (PgTx.all_later)
            with self._lock:
                self._connections.append(conn)
        return conn

    def _call(self, op: Callable[[Tx], T]) -> T:
        for attempt in range(_ATTEMPTS):
            conn = self._connection()
            try:
                setting = ALONE_LOCK_TIMEOUT if self._local.grouped else None
                result, commit = _attempt(
                    conn, op, outbox=self.outbox, setting=setting, spare=self._local.spare
                )
                self._local.grouped = False  # committed: a RESET sent is in force
                if commit is not None:
                    run_handoffs(commit.handoffs)  # in this process only, and only once committed
                    for observer in self._observers:
                        observer(commit)
                return result
            except _RETRYABLE:
                _rollback(conn)
                if attempt == _ATTEMPTS - 1:
                    raise
            except psycopg.OperationalError:
                # Not retried: the commit may have happened before the connection broke.
                conn.close()
                raise
            except BaseException:
                if not conn.closed:
                    _rollback(conn)
                raise
        raise AssertionError("unreachable")

    def _run_group(self, ops: list[Op]) -> list[Outcome]:
        """Run a group of operations in one transaction (on a pool thread): each its outcome.

        An operation that raises before writing fails alone (:func:`_attempt_group`). What
        cannot be undone alone, or pinned on one operation of a pipelined group (a write that
        failed without the script handling it, a lock waited for too long, a failed commit),
        rolls the group back, and its operations run again one by one, each in its own
        transaction, as if they had never been grouped. A lost connection fails them all: the
        commit may have happened.
        """
        if len(ops) == 1:
            return [_outcome(self._call, ops[0])]
        conn = self._connection()
        try:
            setting = None if self._local.grouped else GROUP_LOCK_TIMEOUT
            outcomes, commit = _attempt_group(
                conn, ops, outbox=self.outbox, setting=setting, spare=self._local.spare
            )
            self._local.grouped = True  # committed: the SET sent (or an earlier one) is in force
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                conn.close()
                return [(False, exc)] * len(ops)
            _rollback(conn)  # a lock timeout (an OperationalError too), a failed write, ...
            return [_outcome(self._call, op) for op in ops]
        except Ungroupable:
            _rollback(conn)
            return [_outcome(self._call, op) for op in ops]
        except BaseException:
            if not conn.closed:
                _rollback(conn)
            raise
        if commit is not None:
            run_handoffs(commit.handoffs)
            for observer in self._observers:
                observer(commit)
        return outcomes

    async def run(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` in the next group's transaction on a pool thread (``groups.py``)."""
        return await self.groups.run(op)

    async def _run_alone(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` in a transaction of its own on a pool thread."""
        self._alone += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, op)
        finally:
            self._alone -= 1

    async def scan(self, op: Callable[[Tx], T]) -> T:
        """Run a read-only ``op`` that may scan on the events pool, under a statement timeout
        (:class:`QueryTimeout`); a close cancels what runs (:class:`StorageClosed`)."""
        if self._stop.is_set():
            raise StorageClosed("storage is closed")
        return await asyncio.get_running_loop().run_in_executor(self._scanners, self._scan, op)

    def _scan(self, op: Callable[[Tx], T]) -> T:
        if self._stop.is_set():
            raise StorageClosed("storage is closed")
        conn: psycopg.Connection[Any] | None = getattr(self._scan_local, "conn", None)
        if conn is None or conn.closed:
            conn = self._scan_local.conn = psycopg.connect(self.conninfo, autocommit=True)
            with self._lock:
                self._scan_connections.append(conn)
        try:
            result, _ = _attempt(conn, op, timeout_ms=max(1, round(self.query_timeout * 1000)))
            return result
        except pg_errors.QueryCanceled as exc:  # the statement timeout, or close() cancelled it
            _rollback(conn)
            if self._stop.is_set():
                raise StorageClosed("storage is closed") from exc
            raise QueryTimeout(self.query_timeout) from exc
        except psycopg.OperationalError:
            conn.close()
            raise
        except BaseException:
            if not conn.closed:
                _rollback(conn)
            raise

    def pool_stats(self) -> PoolStats:
        """The pool now: its size, connections open, threads running a group or a read, and
        operations waiting (for a lane, or reads for a thread)."""
        running = self.groups.busy + self._alone
        busy = min(running, self.pool_size)
        return PoolStats(self.pool_size, len(self._connections), busy, self.groups.queued + running - busy)

    def observe(self, callback: Callable[[Commit], None]) -> Callable[[], None]:
        """Call ``callback`` (on the pool thread) with each transaction of this process that
        published something, once it committed (see ``Backend.observe``)."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)

    def subscribe(self, callback: Callable[[Commit | None], None]) -> Callable[[], None]:
        """Call ``callback`` (on the listener thread) with what each transaction published."""
        self._subscribers.append(callback)
        if self._listener is None:
            ready = threading.Event()
            self._listener = threading.Thread(
                target=self.supervisor.keep_thread,
                args=(LISTENER, lambda: self._listen(ready), self._stop),
                name="slotkeeper-pg-listen",
                daemon=True,
            )
            self._listener.start()
            ready.wait(10)
        return lambda: self._subscribers.remove(callback)

    def _deliver(self, commit: Commit | None) -> None:
        for callback in self._subscribers:
            callback(commit)

    def _listen(self, ready: threading.Event) -> None:
        """Deliver every notification until stopped; reconnect when the connection is lost.

        Runs under :attr:`supervisor`: any other error ends this call, is logged, and the
        supervisor calls it again (which tells subscribers that events may have been missed).
        """
        delay = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if self._listened:
                        self._deliver(None)  # events may have been missed meanwhile
                    self._listened = True
                    ready.set()
                    delay = 0.1
                    while not self._stop.is_set():
                        # Drain first, decode after: a batch sent as ids is read back from the
                        # table, which cannot happen on a connection inside notifies().
                        payloads = [n.payload for n in conn.notifies(timeout=0.5, stop_after=1)]
                        for payload in payloads:
                            commit = _decode_or_skip(conn, payload)
                            if commit is not None:
                                self._deliver(commit)
            except psycopg.Error as exc:
                ready.set()
                if self._stop.is_set():
                    break
                log.warning("event listener lost its connection (%s); reconnecting", exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def read(self, op: Callable[[Tx], T]) -> T:
        """Read-only ops run alone: on any pool thread, beside the groups."""
        return await self._run_alone(op)

    async def close(self) -> None:
        """Wait for running operations, cancel running event queries, then close every
        connection."""
        await self.groups.close()
        self._stop.set()
        with self._lock:
            scanning = list(self._scan_connections)
        for conn in scanning:  # a query in flight ends at once (QueryCanceled -> StorageClosed)
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=5)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self._scanners.shutdown(cancel_futures=True))
        await loop.run_in_executor(None, self._executor.shutdown)
        if self._listener is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._listener.join, 5)
        with self._lock:
            for conn in [*self._connections, *self._scan_connections]:
                conn.close()
            self._connections.clear()
            self._scan_connections.clear()


def _attempt(
    conn: psycopg.Connection[Any],
    op: Callable[[Tx], T],
    timeout_ms: int | None = None,
    *,
    outbox: bool = False,
    setting: bytes | None = None,
    spare: list[psycopg.Cursor[Any]] | None = None,
) -> tuple[T, Commit | None]:
    """Run ``op`` in one transaction, in pipeline mode: a statement is sent without waiting for
    the previous one's answer, and the op waits only where it reads a result (``Tx.one``,
    ``Tx.all``, ``Tx.run``). BEGIN goes out with the first statement, and the writes after the
    last read go out with the ``NOTIFY`` and the COMMIT: one round trip for all of them.

    The server still runs the statements one after the other, in order, each (READ COMMITTED)
    with a snapshot taken when it starts: a read sent after the limit locks sees every change
    committed before they were granted. An error aborts the rest of the pipeline and is raised
    where the op next reads, or here at the commit; the caller rolls back.

    ``timeout_ms`` bounds every statement of the transaction (``SET LOCAL statement_timeout``,
    sent with BEGIN: no round trip of its own); ``setting``, a statement sent after BEGIN (the
    connection's ``lock_timeout``, :data:`ALONE_LOCK_TIMEOUT`); ``spare``, the connection's
    cursors for the reads taken later (:class:`PgTx`).
    """
    with conn.pipeline() as pipeline, conn.cursor() as cursor:
        cursor.execute(b"BEGIN", prepare=False)
        if timeout_ms is not None:
            cursor.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}".encode(), prepare=False)
        if setting is not None:
            cursor.execute(setting, prepare=False)
        tx = PgTx(cursor, POSTGRES, psycopg.IntegrityError, pipeline, outbox=outbox, spare=spare)
        try:
            result = op(tx)
        except psycopg.Error:
            raise  # the pipeline is aborted: the caller rolls back once it is out of it
        except BaseException:
            # The op refused (no slots, not found, ...): roll back with the same round trip that
            # leaves the pipeline.
            cursor.execute(b"ROLLBACK", prepare=False)
            raise
        commit = tx.committed()
        tx.send_writes(_notifications(commit))
        cursor.execute(b"COMMIT", prepare=False)
        pipeline.sync()  # raises the error of any pipelined write: then nothing was committed
    return result, commit


#: An INSERT whose only row source is one ``VALUES`` tuple (what ``PgTx.write_many`` merges).
_ONE_ROW_INSERT = re.compile(
    r"^(\s*INSERT\s.*?\bVALUES\s*)\(((?:[^()]|%\(\w+\)s)*)\)\s*$", re.DOTALL | re.IGNORECASE
)
_NAMED = re.compile(r"%\((\w+)\)s")


class PgTx(Tx):
    """:class:`Tx` on PostgreSQL, with fewer statements for the same writes.

    In pipeline mode psycopg sends and processes every statement on its own, about 11 µs of
    driver time each and as much of the server's, and each row of an ``executemany`` is one. So:

    * several rows for one one-row ``INSERT ... VALUES (...)`` (a group's events, inserted
      together before its COMMIT by ``Tx.flush``) go as one multi-row ``VALUES`` statement;
    * writes that nothing waits for (``write``, ``write_many``) are held until the next
      statement of any other kind (or :meth:`send_writes`, before the COMMIT), and consecutive
      held writes go as one statement, the first ones as data-modifying ``WITH`` parts of the
      last (an acquisition's limit update, lease and grant: one statement, not three). The parts
      of one statement all see the snapshot it started with and not each other's changes, so
      writes are joined only when no part writes a table that another part names (each table
      written once, read by no other part); otherwise a new statement starts. Foreign keys are
      checked at the end of the statement, after every part.

    They still run in the order sent, before anything sent after them; a write that fails
    raises where it would have (at the next statement waited for, or at the commit).
    """

    __slots__ = ("_held", "_spare", "_used")

    def __init__(self, *args: Any, spare: list[psycopg.Cursor[Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Writes not sent yet: (statement in psycopg's positional form, its parameters).
        self._held: list[tuple[_Write, list[Any]]] = []
        #: The connection's cursors for :meth:`all_later`, kept from one transaction to the next
        #: (creating one costs about 3 µs; a pair reads through six), and how many this one used.
        self._spare = spare
        self._used = 0

    def write(self, query: str, params: Params | None = None) -> None:
        self.writes += 1
        self._hold(_write_of(POSTGRES.sql(query)), params or {})

    def write_many(self, query: str, rows: Iterable[Params]) -> None:
        rows = list(rows)
        if not rows:
            super().write_many(query, rows)  # as before: psycopg sends nothing
            return
        self.writes += 1
        sql = POSTGRES.sql(query)
        parts = _merged_insert(sql) if len(rows) > 1 else None
        if parts is not None:
            head, names = parts
            one = "(" + ", ".join(["%s"] * len(names)) + ")"
            merged = _write_of(head + ", ".join([one] * len(rows)), names * len(rows))
            self._held.append((merged, [row[name] for row in rows for name in names]))
            return
        write = _write_of(sql)
        for row in rows:
            self._hold(write, row)

    def _hold(self, write: _Write, params: Params) -> None:
        self._held.append((write, [params[name] for name in write.names]))

    def send_writes(self, notifications: list[list[Any]] | None = None) -> None:
        """Send the writes held (before a statement of another kind, and before the COMMIT).

        ``notifications`` (before the COMMIT): the parameters of each :data:`_NOTIFY` to send
        after them. The first is the main statement of the last writes' ``WITH`` (it reads and
        writes no table, and data-modifying ``WITH`` parts run to completion whether or not
        the main statement reads them): one statement less per transaction.
        """
        held, self._held = self._held, []
        notifications = list(notifications or [])
        while held:
            first = held[0][0]
            count, written, named = 1, {first.table}, set(first.words)
            while first.table is not None and count < len(held):
                write = held[count][0]
                # Joined only if it writes a table no part writes or names, and names none
                # that a part writes.
                if write.table is None or write.table in written or write.table in named:
                    break
                if not written.isdisjoint(write.words):
                    break
                written.add(write.table)
                named |= write.words
                count += 1
            part, held = held[:count], held[count:]
            if not held and notifications and first.table is not None:
                # The last writes, joinable: the first notification is their main statement.
                part.append((_NOTIFY_WRITE, notifications.pop(0)))
            elif count == 1:
                self._cursor.execute(part[0][0].sql, part[0][1])
                continue
            ctes = ", ".join(f"w{i} AS ({w.sql})" for i, (w, _) in enumerate(part[:-1]))
            self._cursor.execute(f"WITH {ctes} {part[-1][0].sql}", [v for _, values in part for v in values])
        for params in notifications:
            self._cursor.execute(_NOTIFY, params)

    def one(self, query: str, params: Params | None = None) -> Row | None:
        self.send_writes()
        return super().one(query, params)

    def all(self, query: str, params: Params | None = None) -> list[Row]:
        self.send_writes()
        return super().all(query, params)

    def all_later(self, query: str, params: Params | None = None) -> Callable[[], list[Row]]:
        self.send_writes()
        return super().all_later(query, params)

    def write_now(self, query: str, params: Params | None = None) -> int:
        self.send_writes()
        return super().write_now(query, params)

    def _later_cursor(self) -> Any:
        """The next spare cursor (one per read of this transaction: each keeps its rows until
        they are taken), or a new one, kept for the next transactions."""
        if self._spare is None:
            return super()._later_cursor()
        if self._used == len(self._spare):
            self._spare.append(self._cursor.connection.cursor())
        self._used += 1
        return self._spare[self._used - 1]


@dataclass(frozen=True, slots=True)
class _Write:
    """A write statement as :class:`PgTx` holds it: positional parameters, and what it touches."""

    sql: str
    names: tuple[str, ...]
    #: The table it writes (INSERT, UPDATE, DELETE), or None: then it is never joined.
    table: str | None
    #: Every word of the statement: the tables it may read are among them.
    words: frozenset[str]


#: :data:`_NOTIFY` as the last part of a statement of held writes (``PgTx.send_writes``).
_NOTIFY_WRITE = _Write(_NOTIFY, ("channel", "payload"), None, frozenset())

_WRITES = re.compile(r"^\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)", re.IGNORECASE)
_WORDS = re.compile(r"\w+")


@functools.lru_cache(maxsize=256)
def _write_of(sql: str, names: tuple[str, ...] | None = None) -> _Write:
    """``sql`` (psycopg's named form, or positional with ``names``) as a :class:`_Write`."""
    if names is None:
        names = tuple(_NAMED.findall(sql))
        sql = _NAMED.sub("%s", sql)
    match = _WRITES.match(sql)
    returning = re.search(r"\bRETURNING\b", sql, re.IGNORECASE) is not None
    table = match.group(1).lower() if match and not returning else None
    return _Write(sql, names, table, frozenset(w.lower() for w in _WORDS.findall(sql)) - {table or ""})


@functools.lru_cache(maxsize=64)
def _merged_insert(sql: str) -> tuple[str, tuple[str, ...]] | None:
    """``(the statement up to its VALUES, the parameter names of its row)``, or None if it is
    not a one-row ``INSERT ... VALUES (...)`` of named parameters only."""
    match = _ONE_ROW_INSERT.match(sql)
    if match is None:
        return None
    names = tuple(_NAMED.findall(match.group(2)))
    if not names or _NAMED.sub("", match.group(2)).replace(",", "").strip():
        return None  # something other than parameters in the row: leave it alone
    return match.group(1), names


class Ungroupable(Exception):
    """An operation of a group failed in a way that cannot be undone alone: the group rolls back
    and its operations run one by one (``PostgresBackend._run_group``)."""


def _attempt_group(
    conn: psycopg.Connection[Any],
    ops: list[Op],
    *,
    outbox: bool = False,
    setting: bytes | None = None,
    spare: list[psycopg.Cursor[Any]] | None = None,
) -> tuple[list[Outcome], Commit | None]:
    """Run ``ops`` one after the other in one transaction, in pipeline mode (as :func:`_attempt`).

    Scripts decide before they write: one that raises having sent only reads (its locks, a
    refused acquisition) fails alone, with nothing to undo but what it queued to publish and
    its deferred rows. Its row locks stay until the group commits. One that raises after a
    write, or returns after catching a database error itself (the transaction is then aborted),
    cannot be undone alone without a savepoint per operation (two statements each, which cost
    more than this rare case): :class:`Ungroupable` is raised, and so is a database error that
    escapes an operation or the commit; the caller rolls back. Consecutive :class:`TwoHalves`
    operations send their first halves together (:func:`_run_batch`). ``setting``: a statement
    sent after BEGIN (:data:`GROUP_LOCK_TIMEOUT`, when the connection does not have it yet);
    ``spare``: as for :func:`_attempt`.
    """
    outcomes: list[Outcome] = []
    with conn.pipeline() as pipeline, conn.cursor() as cursor:
        cursor.execute(b"BEGIN", prepare=False)
        if setting is not None:
            cursor.execute(setting, prepare=False)
        # The group's server-written events are inserted together before its COMMIT, one
        # statement per table (``Tx.insert_at_commit``); an operation that fails drops its own.
        tx = PgTx(cursor, POSTGRES, psycopg.IntegrityError, pipeline, defer=True, outbox=outbox, spare=spare)
        start = 0
        while start < len(ops):
            end = start
            while end < len(ops) and isinstance(ops[end], TwoHalves):
                end += 1
            if end == start:
                outcomes.append(_finish_in_group(conn, tx, ops[start], None, 0))
                start += 1
                continue
            _run_batch(conn, tx, ops[start:end], outcomes)
            start = end
        tx.flush()
        commit = tx.committed()
        tx.send_writes(_notifications(commit))
        cursor.execute(b"COMMIT", prepare=False)
        pipeline.sync()  # raises the error of any pipelined statement: then nothing was committed
    return outcomes, commit


def _run_batch(conn: psycopg.Connection[Any], tx: Tx, batch: list[Op], outcomes: list[Outcome]) -> None:
    """Run consecutive :class:`TwoHalves` operations of a group with their reads batched.

    Every operation's first half (its locks and reads) is sent before any is finished: the
    group waits for them all in one round trip instead of one per operation. The statements
    still run in the order they were sent, so an operation's reads ran before the writes of the
    operations before it in the batch. That changes nothing for one whose limits none of those
    touched (its locks keep every other transaction out, and rows of other limits are not what
    it decides on); one whose locked limits an earlier operation of the batch locked too, or
    that follows one that may have changed other limits (admission), sends its reads again
    behind those writes (``refresh``; its locks are held already, so this costs one round trip
    and no wait) before it decides: every decision is made on rows that include every earlier
    write of the group, as when the operations ran one after the other.
    """
    sent: list[tuple[Op, Any, int]] = []
    for op in batch:
        assert isinstance(op, TwoHalves)
        writes = tx.writes
        try:
            reads = op.send(tx)
        except psycopg.Error:
            raise
        except Exception as exc:
            if tx.writes != writes:
                raise Ungroupable("an operation failed after writing") from exc
            sent.append((op, exc, 0))
            continue
        sent.append((op, reads, tx.writes - writes))
    touched: set[str] = set()
    stale = False  # an earlier operation may have changed limits it did not lock first
    for op, reads, first_writes in sent:
        if isinstance(reads, Exception):
            outcomes.append((False, reads))
            continue
        try:
            locked = reads.locked_ids()  # the first of these waits for the whole batch's reads
        except psycopg.Error:
            raise
        if stale or locked & touched:
            reads.refresh(tx)
        touched |= locked
        outcomes.append(_finish_in_group(conn, tx, op, reads, first_writes))
        stale = stale or reads.admits()


def _finish_in_group(conn: psycopg.Connection[Any], tx: Tx, op: Op, reads: Any, first_writes: int) -> Outcome:
    """Run one operation of a group (``op``, or the second half of a :class:`TwoHalves` with
    ``reads``, its first half's, which wrote ``first_writes`` statements): its outcome. One
    that raises having written nothing fails alone (what it published is dropped)."""
    mark, writes = tx.mark(), tx.writes
    try:
        result = op(tx) if reads is None else op.finish(tx, reads)  # type: ignore[attr-defined]
    except psycopg.Error:
        raise
    except Exception as exc:
        if tx.writes != writes or first_writes:
            raise Ungroupable("an operation failed after writing") from exc
        tx.rollback_to(mark)
        return False, exc
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        raise Ungroupable("an operation handled a database error")
    return True, result


def _outcome(call: Callable[[Op], Any], op: Op) -> Outcome:
    try:
        return True, call(op)
    except Exception as exc:
        return False, exc


def _rollback(conn: psycopg.Connection[Any]) -> None:
    """End a failed transaction (if ``_attempt`` did not already)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.execute(b"ROLLBACK", prepare=False)


def _notifications(commit: Commit | None) -> list[list[Any]]:
    """The parameters of each :data:`_NOTIFY` that carries what the transaction published
    (delivered if and when it commits), in order; none if it published nothing to tell."""
    if commit is None or not (commit.events or commit.woken):
        return []
    events, woken = commit.events, commit.woken
    payload = orjson.dumps({"events": [e.wire() for e in events], "woken": woken})
    if len(payload) > _MAX_PAYLOAD:
        payload = orjson.dumps({"ids": [e.id for e in events], "woken": woken})
    if len(payload) > _MAX_PAYLOAD:  # very large batches: several notifications, order kept
        step = max(1, _MAX_PAYLOAD // 48)
        parts = []
        for i in range(0, max(len(events), len(woken)), step):
            part = {"ids": [e.id for e in events[i : i + step]], "woken": woken[i : i + step]}
            parts.append([CHANNEL, orjson.dumps(part).decode()])
        return parts
    return [[CHANNEL, payload.decode()]]


def _decode_or_skip(conn: psycopg.Connection[Any], payload: str) -> Commit | None:
    """The commit a notification carries, or None (logged) if it cannot be read: one bad
    payload (another version's format, an event this process cannot parse) must not stop the
    listener, which carries every other live event and cross-process wake-up."""
    try:
        return _decode(conn, payload)
    except psycopg.Error:
        raise  # the connection's trouble: the listener reconnects
    except Exception:
        log.exception("skipped a notification on %s that could not be read: %.300r", CHANNEL, payload)
        return None


def _decode(conn: psycopg.Connection[Any], payload: str) -> Commit:
    message = orjson.loads(payload)
    woken: list[str] = message.get("woken", [])
    if "events" in message:
        return Commit([EventRecord.from_wire(e) for e in message["events"]], woken)
    ids: list[str] = message["ids"]
    if not ids:
        return Commit([], woken)
    cursor = conn.execute(POSTGRES.sql(q.SELECT_EVENTS_BY_IDS), {"ids": ids})
    by_id = {row[0]: EventRecord.from_row(row) for row in cursor.fetchall()}
    return Commit([by_id[i] for i in ids if i in by_id], woken)
