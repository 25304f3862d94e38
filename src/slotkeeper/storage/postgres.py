"""The PostgreSQL backend: a pool of connections, one per worker thread.

Every operation runs in its own transaction on one of ``pool_size`` threads, each owning one
psycopg connection. Row locks (``SELECT ... ORDER BY id FOR UPDATE``) serialise operations on the
same limits across every thread and every server process sharing the database. A deadlock or
serialisation failure is retried (the transaction was rolled back, so nothing happened twice);
any other error rolls the transaction back and is raised.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from slotkeeper.storage.dialect import POSTGRES, Tx

T = TypeVar("T")

_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
_ATTEMPTS = 5


class PostgresBackend:
    """Runs transaction scripts on a pool of threads, each with its own connection."""

    name = "postgresql"

    def __init__(self, conninfo: str, pool_size: int = 8) -> None:
        self.conninfo = conninfo
        # Fail at start-up, not at the first request, when the database is unreachable.
        psycopg.connect(conninfo).close()
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(pool_size, thread_name_prefix="slotkeeper-pg")

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.conninfo, autocommit=False)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _call(self, op: Callable[[Tx], T]) -> T:
        for attempt in range(_ATTEMPTS):
            conn = self._connection()
            try:
                with conn.cursor() as cursor:
                    result = op(Tx(cursor, POSTGRES, psycopg.IntegrityError))
                conn.commit()
                return result
            except _RETRYABLE:
                conn.rollback()
                if attempt == _ATTEMPTS - 1:
                    raise
            except psycopg.OperationalError:
                # Not retried: the commit may have happened before the connection broke.
                conn.close()
                raise
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        raise AssertionError("unreachable")

    async def run(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` in one transaction on a pool thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, op)

    async def close(self) -> None:
        """Wait for running operations, then close every connection."""
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
