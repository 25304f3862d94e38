"""What a backend is, and the one way storage hands it a transaction script.

A *transaction script* is a function of one open :class:`~slotkeeper.storage.tx.Tx`: the backend
runs it inside one transaction, commits what it wrote if it returns, and rolls everything back if
it raises. :class:`Backend` is the interface both backends (``sqlite.py``, ``postgres.py``)
implement; everything above them sends scripts through :func:`run` or :func:`read`, which turn
the driver's "cannot serve this now" errors into the project's own
:class:`~slotkeeper.errors.DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from slotkeeper.errors import DatabaseUnavailable
from slotkeeper.storage.tx import Commit, Tx
from slotkeeper.supervisor import Supervisor

T = TypeVar("T")

#: A transaction script: what one transaction does.
Script = Callable[[Tx], T]


class Backend(Protocol):
    """Runs a transaction script: commits its writes if it returns, rolls back if it raises."""

    name: str
    #: The driver's errors that mean "the database cannot serve this now" (a lost connection, a
    #: locked or damaged file), as opposed to a bug: :func:`run` raises them as
    #: :class:`~slotkeeper.errors.DatabaseUnavailable`.
    unavailable: tuple[type[Exception], ...]
    #: Gateway mode: every server event is also queued in the outbox, in its transaction
    #: (``Tx.outbox``); set by :meth:`~slotkeeper.storage.core.Storage.outbox_store`.
    outbox: bool
    #: Keeps the backend's own background threads running (and the storage's loops: the reaper,
    #: retention); what ``/api/ready`` asks (see ``slotkeeper.supervisor``).
    supervisor: Supervisor

    def run(self, script: Script[T]) -> Awaitable[T]:
        """Hand ``script`` to the backend now (SQLite: a future) or when awaited (a coroutine);
        its outcome, with the driver's own errors (see :func:`run`)."""
        ...

    async def read(self, script: Script[T]) -> T:
        """Run a read-only script, possibly beside the writes (views, statistics)."""
        ...

    async def scan(self, script: Script[T]) -> T:
        """Run a read-only script that may scan a large table (event queries): on connections
        and threads of its own (``events_pool_size``), so that no such query can delay a write
        or a view, and stopped after ``query_timeout`` seconds
        (:class:`~slotkeeper.errors.QueryTimeout`) or when the backend closes
        (:class:`~slotkeeper.errors.StorageClosed`)."""
        ...

    async def close(self) -> None: ...

    def subscribe(self, callback: Callable[[Commit | None], None]) -> Callable[[], None]:
        """Deliver what every transaction published (events, woken waiters), in commit order, to
        ``callback`` (called from any thread).

        Returns a function that stops the delivery.

        ``None`` means publications may have been missed (a lost database connection): live
        subscribers must start again from the store, waiters must look at their rows.
        """

    def observe(self, callback: Callable[[Commit], None]) -> Callable[[], None]:
        """Call ``callback`` with each commit of *this process* that published something, right
        after it committed, on the committing thread; returns a function that stops it.

        Unlike :meth:`subscribe`, never another process's commits: what a process counts from
        here (metrics) sums across processes without counting anything twice.
        """
        ...


def run(backend: Backend, script: Script[T]) -> Awaitable[T]:
    """Hand ``script`` to ``backend`` now (the backend has it before this returns) and return its
    outcome to await; a driver error that means the database is unavailable raises
    :class:`~slotkeeper.errors.DatabaseUnavailable` from it."""
    return _translated(backend.run(script), backend.unavailable)


def read(backend: Backend, script: Script[T]) -> Awaitable[T]:
    """:func:`run` for a read-only script (:meth:`Backend.read`)."""
    return _translated(backend.read(script), backend.unavailable)


def scan(backend: Backend, script: Script[T]) -> Awaitable[T]:
    """:func:`run` for a read-only script that may scan (:meth:`Backend.scan`)."""
    return _translated(backend.scan(script), backend.unavailable)


def send(backend: Backend, script: Script[T]) -> asyncio.Future[T]:
    """Hand ``script`` to ``backend`` now; the future of its outcome. The script runs to its end
    whatever becomes of the future (a caller that must survive its own cancellation shields it),
    and its errors are the driver's own: turn them with :func:`unavailable`.

    A backend whose ``run`` answers with a future (SQLite's: scripts queue on the event loop)
    hands that future back, with no task or coroutine around it (an acquisition's path, see
    ``waiting.py``); a coroutine is wrapped in a task.
    """
    return asyncio.ensure_future(backend.run(script))


def unavailable(exc: Exception) -> DatabaseUnavailable:
    """What a driver error that means the database is unavailable is raised as."""
    return DatabaseUnavailable(f"The database is unavailable: {exc}")


async def _translated(outcome: Awaitable[T], unavailable_errors: tuple[type[Exception], ...]) -> T:
    try:
        return await outcome
    except unavailable_errors as exc:
        raise unavailable(exc) from exc
