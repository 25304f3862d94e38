"""The SQLite backend: one writer thread that commits operations in groups.

SQLite allows one writer at a time. Instead of many connections taking turns on the file lock
(Prefect's "database is locked" under load), every operation goes to one thread that owns the
only connection. The thread takes whatever operations are waiting, runs each inside its own
SAVEPOINT (so one failing operation rolls back alone) and commits them all at once: the cost of
a commit is shared by the whole group. A caller's future is completed only after the commit, so
nothing is ever reported before it is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from slotkeeper.errors import StorageClosed
from slotkeeper.storage.dialect import SQLITE, Commit, Tx

T = TypeVar("T")

#: Most operations one commit may carry; bounds the latency a group adds to its first member.
MAX_GROUP = 256

_Item = tuple[Callable[[Tx], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class SQLiteBackend:
    """Runs transaction scripts on one connection in one thread, with group commit."""

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._subscribers: list[Callable[[Commit | None], None]] = []
        self._thread = threading.Thread(target=self._main, name="slotkeeper-sqlite", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def run(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` in the next group; return its result once the group has committed."""
        if self._closed:
            raise StorageClosed("storage is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((op, loop, future))
        return await future

    def subscribe(self, callback: Callable[[Commit | None], None]) -> Callable[[], None]:
        """Call ``callback`` (on the writer thread) with what each group published, after its commit."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def close(self) -> None:
        """Finish the queued operations, then close the connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; a power loss may lose the last
        # groups but never corrupts the database.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _main(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        cursor = conn.cursor()
        tx = Tx(cursor, SQLITE, sqlite3.IntegrityError)
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            self._run_group(conn, cursor, tx, group)
        conn.close()

    def _run_group(
        self, conn: sqlite3.Connection, cursor: sqlite3.Cursor, tx: Tx, group: list[_Item]
    ) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            cursor.execute("BEGIN IMMEDIATE")
            for op, _, _ in group:
                cursor.execute("SAVEPOINT op")
                mark = tx.mark()
                try:
                    result = op(tx)
                except BaseException as exc:
                    cursor.execute("ROLLBACK TO op")
                    cursor.execute("RELEASE op")
                    tx.rollback_to(mark)  # a rolled-back op published nothing
                    outcomes.append((False, exc))
                else:
                    cursor.execute("RELEASE op")
                    outcomes.append((True, result))
            cursor.execute("COMMIT")
        except BaseException as exc:  # the commit itself failed: nothing of the group holds
            if conn.in_transaction:
                conn.rollback()
            outcomes = [(False, exc)] * len(group)
            tx.committed()  # dropped: nothing of the group holds
        else:
            committed = tx.committed()
            if committed is not None:
                for callback in self._subscribers:
                    callback(committed)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, loop, future), (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, results in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
