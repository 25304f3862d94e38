"""Storage: the one interface above the backends, a short façade over the transaction scripts.

Each public coroutine sends one transaction script (``scripts.py`` and the modules it groups:
``limits.py``, ``slots.py``, ``queue.py``) to the backend, which runs it inside one transaction:
on SQLite in the next group commit on the event loop, on PostgreSQL on a pool thread. What a
request of this process does while it acquires or waits (cancellation, the wait itself, the
heartbeat of its waiters) is in ``waiting.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from slotkeeper.domain import Limit, RetryPolicy
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import AcquireRequest, Granted, LeaseInfo, LimitSpec, LimitView
from slotkeeper.storage import backend as transactions
from slotkeeper.storage.backend import Backend, Script
from slotkeeper.storage.events import EventStore
from slotkeeper.storage.groups import TwoHalves
from slotkeeper.storage.outbox import OutboxStore
from slotkeeper.storage.scripts import Scripts
from slotkeeper.storage.tx import Commit
from slotkeeper.storage.views import ViewStore
from slotkeeper.storage.waiting import SHUTDOWN_RETRY_AFTER, Acquisitions, Observer, Waiters
from slotkeeper.supervisor import Supervisor

T = TypeVar("T")

log = logging.getLogger("slotkeeper.reaper")


class Storage:
    """The one storage interface; the backend decides where the transactions run.

    ``scripts`` are the transaction scripts this storage runs (``TagStore`` runs its own over
    them); ``waiters`` are the waiting requests of this process.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.backend = backend
        self.waiters = Waiters(release=self.release_lease)
        self.scripts = Scripts(
            self.waiters, clock=clock, retry_policy=retry_policy, one_writer=backend.name == "sqlite"
        )
        self._acquisitions = Acquisitions(backend, self.scripts, release=self.release_lease)
        #: Expired leases the reaper's last pass could not end (see :meth:`reap_expired`).
        self._failing_leases: set[str] = set()

    @property
    def clock(self) -> Callable[[], float]:
        """The server's clock: every script reads ``now`` from it."""
        return self.scripts.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.scripts.clock = clock

    @property
    def retry_policy(self) -> RetryPolicy:
        """How long refused callers are told to wait."""
        return self.scripts.retry_policy

    @property
    def observer(self) -> Observer | None:
        """Told of refusals and waits (the metrics), when set."""
        return self._acquisitions.observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self._acquisitions.observer = observer

    @property
    def owner(self) -> str:
        """This process, as the owner of the waiters it queues (their heartbeat)."""
        return self.waiters.owner

    @property
    def waiting_requests(self) -> int:
        """Requests of this process waiting in the queue now."""
        return len(self.waiters)

    def _run(self, script: Script[T]) -> Awaitable[T]:
        return transactions.run(self.backend, script)

    @property
    def supervisor(self) -> Supervisor:
        """Keeps the background loops over this storage running (its backend's threads, the
        reaper, retention) and knows which fail: what readiness asks."""
        return self.backend.supervisor

    async def close(self) -> None:
        """Finish pending work and close every connection."""
        await self._acquisitions.close()
        await self.backend.close()

    # --- events ---------------------------------------------------------------------------------

    def event_store(self) -> EventStore:
        """An event store over the same database (ingest, query, count, retention)."""
        return EventStore(self.backend, self.clock)

    def outbox_store(self) -> OutboxStore:
        """The outbox of events for an upstream Prefect server (gateway mode); events are queued
        in it only once :meth:`OutboxStore.enable` was called."""
        return OutboxStore(self.backend, self.clock)

    def view_store(self) -> ViewStore:
        """The operator's read-only views over the same database (overview, a limit's state)."""
        return ViewStore(self.backend, self.clock)

    def subscribe_events(self, callback: Callable[[list[EventRecord] | None], None]) -> Callable[[], None]:
        """Call ``callback`` with the events of every committed transaction that wrote some, in
        commit order, from whichever thread committed it (not the loop's, on PostgreSQL).
        ``None`` means events may have been missed (a lost database connection): start again
        from the store. Returns a function that stops the delivery."""

        def on_commit(commit: Commit | None) -> None:
            if commit is None:
                callback(None)
            elif commit.events:
                callback(commit.events)

        return self.backend.subscribe(on_commit)

    def observe(self, callback: Callable[[Commit], None]) -> Callable[[], None]:
        """Call ``callback`` with each commit of this process that published something, right
        after it, on the committing thread (``Backend.observe``); returns what stops it."""
        return self.backend.observe(callback)

    # --- limits ---------------------------------------------------------------------------------

    async def create_limit(self, spec: LimitSpec) -> LimitView:
        """Create a limit; :class:`Conflict` if the name is taken."""
        return await self._run(lambda tx: self.scripts.limits.create(tx, spec))

    async def read_limit(self, key: str) -> LimitView:
        """The limit with this id or name; :class:`NotFound` if none."""
        return await self._run(lambda tx: self.scripts.limits.read(tx, key))

    async def list_limits(self, limit: int, offset: int, prefix: str | None = None) -> list[LimitView]:
        """A page of limits ordered by name, optionally only names starting with ``prefix``."""
        return await self._run(lambda tx: self.scripts.limits.page(tx, limit, offset, prefix))

    async def update_limit(self, key: str, changes: dict[str, Any]) -> LimitView:
        """Apply the given fields; decay up to now is kept, not discarded as Prefect does."""
        return await self._run(lambda tx: self.scripts.limits.update(tx, key, changes))

    async def delete_limit(self, key: str) -> LimitView:
        """Delete a limit; its grants go with it (their leases stay for their other limits), its
        waiters are refused."""
        return await self._run(lambda tx: self.scripts.limits.delete(tx, key))

    # --- slots ----------------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> Granted:
        """Take slots on every named limit or none: :class:`SlotsUnavailable` when full.

        With ``request.wait`` (and a lease), a request that cannot be granted now waits in the
        queue of its limits for up to that many seconds. Cancelling the call (a client that
        disconnects) leaves nothing held, whenever it happens (see ``waiting.py``).
        """
        return await self._acquisitions.acquire(request)

    async def release_slots(
        self, names: list[str], slots: int, occupancy_seconds: float | None
    ) -> list[Limit]:
        """Plain ``/decrement``: free unleased slots on each active named limit (clamped at 0)."""
        return await self._run(
            lambda tx: self.scripts.slots.release_unleased(tx, names, slots, occupancy_seconds)
        )

    async def release_lease(self, lease_id: str, *, cause: str = builders.RELEASE) -> bool:
        """Release a lease and every slot it holds. False if it was already gone.

        ``cause``: who ends it (``builders.OPERATOR`` for an operator's action), for the metrics.
        """
        slots = self.scripts.slots
        # In two halves, so that a PostgreSQL group sends the reads of several together.
        return await self._run(
            TwoHalves(
                lambda tx: slots.send_end_lease(tx, lease_id),
                lambda tx, reads: slots.end_lease(tx, lease_id, cause=cause, reads=reads),
            )
        )

    async def renew_lease(self, lease_id: str, duration: float) -> bool:
        """Extend a live lease to now + duration. False if it expired or is gone (410)."""
        return await self._run(lambda tx: self.scripts.slots.renew(tx, lease_id, duration))

    async def list_leases(self, key: str) -> list[LeaseInfo]:
        """The live leases on one limit, oldest first."""
        return await self._run(lambda tx: self.scripts.slots.leases_of(tx, key))

    # --- background jobs (the reaper) -----------------------------------------------------------

    async def reap_expired(self, batch: int = 500) -> int:
        """End up to ``batch`` expired leases, exactly once each; return how many ended.

        Each lease ends in its own transaction under the usual lock order (SQLite commits them
        together anyway). A lease renewed or released meanwhile is skipped by the conditional
        delete, and a reaper in another process finds nothing left to delete.
        """
        slots = self.scripts.slots
        ids = await self._run(lambda tx: slots.expired_lease_ids(tx, batch))
        outcomes = await asyncio.gather(
            *(self._run(functools.partial(slots.end_expired, lease_id=i)) for i in ids),
            return_exceptions=True,
        )
        # One lease that cannot end (its limit broken somehow) must not stop the others, nor
        # the sweep after them: it is logged (with its traceback the first pass it fails, then
        # quietly, so a stuck lease does not flood the log) and tried again next pass.
        ended, failing = 0, dict[str, Exception]()
        for lease_id, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, Exception):
                failing[lease_id] = outcome
            elif outcome:
                ended += 1
        for lease_id, error in failing.items():
            if lease_id not in self._failing_leases:
                log.error("could not end expired lease %s; retrying", lease_id, exc_info=error)
        self._failing_leases = set(failing)
        return ended

    async def detach_waiters(self, retry_after: float = SHUTDOWN_RETRY_AFTER, hold: float = 60.0) -> int:
        """The server is shutting down: every request of this process waiting in the queue is
        answered 503 and its place kept for ``hold`` seconds (see ``waiting.py``); returns how
        many."""
        return await self._acquisitions.detach_waiters(retry_after, hold)

    async def sweep_waiters(self) -> int:
        """Drop waiters whose request is gone (no heartbeat, or far past its deadline), and admit
        what fits on every queued limit (decay frees slots without any release). Returns how
        many waiters were dropped."""
        return await self._acquisitions.sweep()


__all__ = ["Storage"]
