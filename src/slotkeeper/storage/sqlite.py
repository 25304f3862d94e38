"""The SQLite backend: group commit on the event loop, reads and checkpoints on threads.

SQLite allows one writer at a time. Instead of many connections taking turns on the file lock
(Prefect's "database is locked" under load), every write operation goes to one connection owned
by the event loop. Operations that arrive while the loop is busy are collected; the next loop
iteration runs them and commits them all at once, so the cost of a commit is shared by the
whole group. An operation that fails before it has changed a row (a 423, a 404: nearly every
failure) has nothing to undo; if one fails after writing, the group runs again from the start,
each operation in its own SAVEPOINT, so that it alone rolls back (see ``_run_group``). A caller's
future is completed only after the commit: nothing is reported before it is durable. The same
holds for the hand-offs of outcomes to this process's waiters (``Tx.handoffs``): run after the
commit, and dropped with an operation that failed.

Why on the loop and not on a writer thread: the statements take microseconds, and a second
Python thread competing for the GIL with a busy event loop waits up to the interpreter's switch
interval (5 ms) every time it wants the GIL back, which is after every statement. Measured on
this hardware, that convoy cost more than the work itself. What could block the loop for long
is moved off it: the WAL is checkpointed (the only fsync with ``synchronous=NORMAL``) by a
thread on its own connection, and read-only queries that may scan (event queries) run on
reader threads with their own connections (WAL lets readers run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from slotkeeper.errors import QueryTimeout, StorageClosed
from slotkeeper.storage.dialect import SQLITE
from slotkeeper.storage.tx import Commit, Tx, run_handoffs
from slotkeeper.supervisor import Supervisor

T = TypeVar("T")

log = logging.getLogger("slotkeeper.storage.sqlite")

#: Most operations one commit may carry; bounds how long one group holds the loop.
MAX_GROUP = 256
#: How often the WAL is checkpointed into the database file.
CHECKPOINT_SECONDS = 1.0
#: The supervised loop that checkpoints the WAL.
CHECKPOINTER = "checkpointer"
#: Reader threads for read-only queries (views, statistics).
READERS = 2
#: SQLite virtual-machine steps between two looks at an event query's deadline (a few ms).
PROGRESS_STEPS = 10_000


def _connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
        return conn
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a process crash; a power loss may lose the last
    # groups but never corrupts the database.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it, off the loop
    # An operation in a SAVEPOINT (the second try of a group, see ``_run_group``) first copies
    # every page it changes to a statement journal: in memory, not a temporary file. Measured
    # when every operation had one: 40 us less CPU per acquire + release pair (255 -> 215 us
    # in-process), most of it the event indexes' pages.
    # Only this writer connection: readers' sorts of large event queries stay on disk.
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class SQLiteBackend:
    """Runs transaction scripts on one connection, on the event loop, with group commit."""

    name = "sqlite"
    #: Any SQLite error that escapes a script (locked, I/O, a damaged file) means "the database
    #: cannot serve this now", not a bug in the request.
    unavailable: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)

    def __init__(self, path: str | Path, *, events_pool_size: int = 2, query_timeout: float = 30.0) -> None:
        self.path = str(path)
        self.shared = self.path != ":memory:"
        if self.shared:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(self.path)
        self._cursor = self._conn.cursor()
        self._tx = Tx(self._cursor, SQLITE, sqlite3.IntegrityError, defer=True)
        #: Gateway mode: server events also go into the outbox (``Tx.outbox``).
        self.outbox = False
        self._pending: list[tuple[Callable[[Tx], Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._closed = False
        self._subscribers: list[Callable[[Commit | None], None]] = []
        self._observers: list[Callable[[Commit], None]] = []
        #: Told the number of operations of every group it commits (metrics), when set.
        self.on_group: Callable[[int], None] | None = None
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="slotkeeper-sqlite-read")
        # Event queries (``scan``) on threads of their own, each stopped at its deadline or at
        # close by a progress handler: a scan never holds the writer (WAL readers do not block
        # it), the views' readers, nor a shutdown (1M prefixes once kept a reader 8 minutes).
        self.events_pool_size = events_pool_size
        #: Seconds an event query may run.
        self.query_timeout = query_timeout
        self._scanners = ThreadPoolExecutor(events_pool_size, thread_name_prefix="slotkeeper-sqlite-events")
        self._stop = threading.Event()
        #: Keeps the checkpointer thread running (restarts it after an unexpected error).
        self.supervisor = Supervisor()
        self._checkpointer: threading.Thread | None = None
        if self.shared:
            self._checkpointer = threading.Thread(
                target=self.supervisor.keep_thread,
                args=(CHECKPOINTER, self._checkpoint_loop, self._stop),
                name="slotkeeper-sqlite-checkpoint",
                daemon=True,
            )
            self._checkpointer.start()

    def run(self, op: Callable[[Tx], T]) -> asyncio.Future[T]:
        """Queue ``op`` in the next group now; the future of its result, set once the group has
        committed. Not a coroutine: the future itself is what the caller awaits (an acquisition
        shields it, ``backend.send``), with no task or coroutine around it. ``op`` runs whatever
        becomes of the future: cancelling it only drops the outcome."""
        if self._closed:
            raise StorageClosed("storage is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((op, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def read(self, op: Callable[[Tx], T]) -> T:
        """Run a read-only ``op`` on a reader thread (it sees the last committed state)."""
        if self._closed:
            raise StorageClosed("storage is closed")
        if not self.shared:  # an in-memory database has one connection only
            return await self.run(op)
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, op)

    async def scan(self, op: Callable[[Tx], T]) -> T:
        """Run a read-only ``op`` that may scan on an events thread, stopped after
        ``query_timeout`` seconds (:class:`QueryTimeout`) or at close (:class:`StorageClosed`)."""
        if self._closed:
            raise StorageClosed("storage is closed")
        if not self.shared:  # an in-memory database has one connection only
            return await self.run(op)
        return await asyncio.get_running_loop().run_in_executor(self._scanners, self._scan, op)

    def _scan(self, op: Callable[[Tx], T]) -> T:
        conn = self._reader()
        deadline = time.monotonic() + self.query_timeout

        def stop() -> bool:  # SQLite interrupts the statement when this returns true
            return self._stop.is_set() or time.monotonic() > deadline

        conn.set_progress_handler(stop, PROGRESS_STEPS)
        try:
            return self._read(op)
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise
            if self._stop.is_set():
                raise StorageClosed("storage is closed") from exc
            raise QueryTimeout(self.query_timeout) from exc
        finally:
            conn.set_progress_handler(None, 0)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path, readonly=True)
        return conn

    def _read(self, op: Callable[[Tx], T]) -> T:
        conn = self._reader()
        cursor = conn.cursor()
        cursor.execute("BEGIN")
        try:
            return op(Tx(cursor, SQLITE, sqlite3.IntegrityError))
        finally:
            cursor.execute("ROLLBACK")

    def subscribe(self, callback: Callable[[Commit | None], None]) -> Callable[[], None]:
        """Call ``callback`` with what each group published, after its commit (on the loop)."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def observe(self, callback: Callable[[Commit], None]) -> Callable[[], None]:
        """Call ``callback`` with what each group published, after its commit: every group is
        this process's (see ``Backend.observe``)."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)

    async def close(self) -> None:
        """Finish the queued operations, then close every connection."""
        if self._closed:
            return
        self._closed = True
        while self._pending or self._scheduled:
            await asyncio.sleep(0)
        self._stop.set()
        loop = asyncio.get_running_loop()
        if self._checkpointer is not None:
            await loop.run_in_executor(None, self._checkpointer.join)
        await loop.run_in_executor(None, self._readers.shutdown)
        # A scan that runs is interrupted by its progress handler now that _stop is set.
        await loop.run_in_executor(None, lambda: self._scanners.shutdown(cancel_futures=True))
        self._conn.close()

    def _flush(self) -> None:
        self._scheduled = False
        group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
        if self._pending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        cursor, tx = self._cursor, self._tx
        tx.outbox = self.outbox
        if self.on_group is not None:
            self.on_group(len(group))
        outcomes: list[tuple[bool, Any]] = []
        committed: Commit | None = None
        try:
            cursor.execute("BEGIN IMMEDIATE")
            ran = self._run_group(group, savepoints=False)
            if ran is None:
                # An operation failed after it had written: only a savepoint undoes it alone.
                # The group runs again from the start, each operation in its own savepoint.
                cursor.execute("ROLLBACK")
                tx.rollback_to((0, 0, 0, 0))  # nothing of the first try is published
                cursor.execute("BEGIN IMMEDIATE")
                ran = self._run_group(group, savepoints=True)
                assert ran is not None
            outcomes = ran
            # The events of every operation that held, in one insert per table, outside the
            # savepoints (see Tx.insert_at_commit).
            tx.flush()
            cursor.execute("COMMIT")
            committed = tx.committed()
        except Exception as exc:  # the commit itself failed: nothing of the group holds
            if self._conn.in_transaction:
                self._conn.rollback()
            tx.discard()
            tx.committed()  # dropped
            outcomes = [(False, exc)] * len(group)
        if committed is not None:
            # Only now: the grants they carry are committed. Before the group's own futures, so
            # that a waiting request's answer (the next holder's start) is the first to go out.
            run_handoffs(committed.handoffs)
        for (_, future), (ok, value) in zip(group, outcomes, strict=True):
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if committed is None:
            return
        for observer in self._observers:
            observer(committed)
        if committed.events or committed.woken:
            for callback in list(self._subscribers):
                callback(committed)

    def _run_group(
        self, group: list[tuple[Callable[[Tx], Any], asyncio.Future[Any]]], *, savepoints: bool
    ) -> list[tuple[bool, Any]] | None:
        """Run the operations of a group in its transaction; their outcomes, in order.

        Without ``savepoints`` (the first try): an operation that fails before it has changed a
        row (a 423, a 404, a refused request: nearly every failure) has nothing to undo in the
        database, and one that succeeds needs no undo at all, so no savepoint is spent on either
        (two statements per operation, about a tenth of an acquire's). None if an operation
        failed after it had changed rows: then the group is run again with ``savepoints``, each
        operation in its own, so that it alone rolls back.
        """
        cursor, tx, conn = self._cursor, self._tx, self._conn
        outcomes: list[tuple[bool, Any]] = []
        for op, _ in group:
            if savepoints:
                cursor.execute("SAVEPOINT op")
            mark = tx.mark()
            changes = conn.total_changes
            try:
                result = op(tx)
            except Exception as exc:
                if savepoints:
                    cursor.execute("ROLLBACK TO op")
                    cursor.execute("RELEASE op")
                elif conn.total_changes != changes:
                    return None
                tx.rollback_to(mark)  # a failed op publishes nothing
                outcomes.append((False, exc))
            else:
                if savepoints:
                    cursor.execute("RELEASE op")
                outcomes.append((True, result))
        return outcomes

    def _checkpoint_loop(self) -> None:
        conn = _connect(self.path, readonly=False)
        try:
            while not self._stop.wait(CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # never fatal: the next pass tries again
                    log.warning("WAL checkpoint failed: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
