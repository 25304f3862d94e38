"""The requests of this process that acquire, and those that wait in the server-side queue.

Two parts, both on the event loop:

* :class:`Waiters`: the registry of this process's waiting requests, and the small interface the
  queue scripts see (``owner``, ``waits_here``, ``hand_over``). A transaction that admits (or
  refuses) a waiter of this process hands its outcome over in memory once it has committed
  (``hand_over``, run by the backend on the committing thread); the registry delivers it to the
  waiting request on the loop, or releases a grant whose request has left.
* :class:`Acquisitions`: how a request acquires: its transaction is sent and, if the request is
  cancelled meanwhile (its client left), whatever it was granted is released; a request that
  waits is queued, waits for its outcome (handed over, or written on its row by another process
  and announced by a ``NOTIFY``), and leaves the queue when it times out or is cancelled. While
  this process has waiters, a heartbeat tells the database they are still there; the sweeper
  drops the waiters of a process that stopped. At a shutdown the waiting requests are answered
  503 and their places kept (:meth:`Acquisitions.detach_waiters`); a retry that names its waiter
  takes its place back (``rejoin``).

See docs/queue.md for the queue's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from slotkeeper.errors import InvalidRequest, ShuttingDown, SlotsUnavailable
from slotkeeper.models import AcquireRequest, Granted
from slotkeeper.storage import backend as transactions
from slotkeeper.storage.backend import Backend, Script
from slotkeeper.storage.groups import TwoHalves
from slotkeeper.storage.tx import Commit

if TYPE_CHECKING:
    from slotkeeper.storage.scripts import LockReads, Scripts

T = TypeVar("T")

log = logging.getLogger("slotkeeper.storage")

#: How often a process tells the database that its waiting requests are still there.
WAITER_HEARTBEAT_SECONDS = 1.0
#: The heartbeat's name among the supervised loops (``backend.supervisor``).
HEARTBEAT = "waiter heartbeat"
#: A waiter not heard of for this long (its process died) leaves the queue.
WAITER_STALE_SECONDS = 5.0
#: The ``owner`` of a waiter whose request was answered at a shutdown: nobody's, its place kept
#: until its deadline (see :meth:`Acquisitions.detach_waiters`).
DETACHED = "detached"
#: ``Retry-After`` of the answer to a request waiting when its server shuts down.
SHUTDOWN_RETRY_AFTER = 1.0

#: How a wait ends in a transaction: granted, or refused (a limit it waits for was deleted).
Outcome = Granted | InvalidRequest

#: Releases a lease by id (the storage's ``release_lease``).
Release = Callable[[str], Awaitable[object]]


class Observer(Protocol):
    """Told, in this process, what the committed events do not say (the metrics)."""

    def refused(self, names: Sequence[str]) -> None:
        """An acquisition naming these limits was refused for want of slots (423)."""

    def waited(self, granted: Granted, seconds: float, handoff: float | None) -> None:
        """A waiting request got its grant ``seconds`` after it arrived; ``handoff``: seconds
        from the transaction that admitted it from the queue to now (None: granted at once)."""


class WaiterGone(Exception):
    """The waiter's row is gone: the sweeper dropped it, or this process admitted or refused it
    (the outcome was handed over in memory, or is released on arrival if the request left).

    Internal to storage: a request that meets it at the end of its wait is told its wait was
    abandoned (423).
    """


class Wake:
    """Where a waiting request of this process learns that its wait may be over (on the loop).

    ``granted`` is its grant, handed over by the transaction that admitted it once that committed;
    ``refused`` its refusal, handed over the same way by the transaction that deleted a limit it
    waited for. ``event`` is set with either, and also when the request should look at its row (a
    grant or refusal written by another process, or publications that may have been missed).
    ``detached``: the server is shutting down and the waiter's row was detached (see
    :meth:`Acquisitions.detach_waiters`): the request is answered :class:`ShuttingDown`.
    """

    __slots__ = ("detached", "event", "granted", "refused")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.granted: Granted | None = None
        self.refused: InvalidRequest | None = None
        self.detached = False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without a loop
        return None


class Waiters:
    """The waiting requests of this process, by waiter id (changed on the loop only; the queue
    scripts look them up on whichever thread runs the transaction)."""

    def __init__(self, release: Release) -> None:
        #: This process, as the owner of the waiters it queues (see the heartbeat).
        self.owner = str(uuid.uuid4())
        self._release = release
        self._wakes: dict[str, Wake] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: Releases of grants that nobody will take (see :meth:`deliver`).
        self._releasing: set[asyncio.Task[None]] = set()
        #: Waiters of this process detached at shutdown: never handed a grant in memory again.
        self._detached: set[str] = set()

    def __len__(self) -> int:
        return len(self._wakes)

    # --- what the queue scripts see -------------------------------------------------------------

    def waits_here(self, waiter_id: str) -> bool:
        """Whether this waiter's request waits in this process (and takes its outcome in memory)."""
        return waiter_id in self._wakes and waiter_id not in self._detached

    def detached(self, ids: Sequence[str]) -> None:
        """These waiters are detached (a shutdown): their outcomes go on their rows from now on."""
        self._detached.update(ids)

    def hand_over(self, waiter_id: str, outcome: Outcome) -> None:
        """Deliver a grant (or a refusal) to a waiting request of this process; run by the backend
        once the transaction that admitted (or refused) it has committed, on the committing
        thread: the loop itself (SQLite, delivered at once) or a pool thread (PostgreSQL,
        delivered on the loop)."""
        loop = self._loop
        assert loop is not None  # set before any waiter of this process is registered
        if _running_loop() is loop:
            self.deliver(waiter_id, outcome)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the lease will expire
            loop.call_soon_threadsafe(self.deliver, waiter_id, outcome)

    # --- on the loop ----------------------------------------------------------------------------

    def listen(self, loop: asyncio.AbstractEventLoop, backend: Backend) -> None:
        """From now on, wake the waiters that committed transactions name (``Commit.woken``);
        all of them when publications may have been missed."""
        if self._unsubscribe is not None:
            return
        self._loop = loop

        def on_commit(commit: Commit | None) -> None:  # a storage thread
            if commit is None or commit.woken:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.wake, None if commit is None else commit.woken)

        self._unsubscribe = backend.subscribe(on_commit)

    def register(self, waiter_id: str, wake: Wake) -> None:
        """A request of this process waits (or is about to queue) as ``waiter_id``."""
        self._wakes[waiter_id] = wake

    def forget(self, waiter_id: str) -> Wake | None:
        """The request no longer waits: an outcome that arrives from now on is released."""
        return self._wakes.pop(waiter_id, None)

    def undecided(self) -> list[str]:
        """The waiters of this process that have not been handed an outcome."""
        return [i for i, wake in self._wakes.items() if wake.granted is None and wake.refused is None]

    def wake(self, woken: list[str] | None) -> None:
        """Tell these waiters (None: every waiter of this process) to look at their rows."""
        targets = list(self._wakes) if woken is None else woken
        for waiter_id in targets:
            wake = self._wakes.get(waiter_id)
            if wake is not None:
                wake.event.set()

    def deliver(self, waiter_id: str, outcome: Outcome) -> None:
        """Give a handed-over outcome to its waiting request, or release a grant whose request
        has left."""
        wake = self._wakes.get(waiter_id)
        if wake is not None and wake.granted is None and wake.refused is None:
            if isinstance(outcome, Granted):
                wake.granted = outcome
            else:
                wake.refused = outcome
            wake.event.set()
            return
        if not isinstance(outcome, Granted):
            return  # a refusal holds nothing
        # The request left (timed out, cancelled) since it was admitted: nobody will ever see
        # this lease, so it is released now (its released events written, the next waiter
        # admitted), not left held until it expires.
        task = asyncio.ensure_future(self._release_quietly(outcome))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_quietly(self, granted: Granted) -> None:
        try:
            if granted.lease_id is not None:
                await asyncio.shield(self._release(granted.lease_id))
        except Exception:  # the storage closed, or the database failed: the lease expires
            log.warning("could not release lease %s handed to a request that left", granted.lease_id)

    async def close(self) -> None:
        """Finish the releases under way; stop listening."""
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()


def _granted(outcome: Outcome) -> Granted:
    """The grant that ends a wait; a refusal is raised."""
    if isinstance(outcome, InvalidRequest):
        raise outcome
    return outcome


async def _to_the_end(sent: asyncio.Future[T]) -> None:
    """Wait until ``sent`` is done, whatever cancellations reach the caller meanwhile."""
    while not sent.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([sent])


class Acquisitions:
    """Acquisitions of this process, safe against cancellation, and the waits among them."""

    def __init__(self, backend: Backend, scripts: Scripts, release: Release) -> None:
        self.backend = backend
        self.scripts = scripts
        self.waiters = scripts.waiters
        self._release = release
        self._heartbeat_task: asyncio.Task[None] | None = None
        #: Told of refusals and waits (metrics), when set.
        self.observer: Observer | None = None
        #: Set by :meth:`detach_waiters`: (Retry-After, how long a detached place is kept).
        self._draining: tuple[float, float] | None = None

    async def acquire(self, request: AcquireRequest) -> Granted:
        """Take slots on every named limit or none (``SlotScripts.acquire``).

        With ``request.wait`` (and a lease), a request that cannot be granted now waits in the
        queue of its limits for up to that many seconds. Cancelling the call (a client that
        disconnects) leaves nothing held, whenever it happens: a lease granted by a transaction
        that was out at that moment, or handed over to the wait meanwhile, is released, and a
        waiter that was queued leaves the queue.
        """
        try:
            if request.wait is not None and request.lease is not None:
                return await self._acquire_waiting(request)
            granted = await self._answer(self._send(self._acquire_now(request)))
        except SlotsUnavailable:
            if self.observer is not None:
                self.observer.refused(request.names)
            raise
        assert granted is not None
        return granted

    def _acquire_now(self, request: AcquireRequest) -> TwoHalves[LockReads, Granted | None]:
        """The script of an acquisition that does not wait, in two halves (``groups.TwoHalves``):
        its locks and reads, then its decision and writes."""
        scripts = self.scripts
        return TwoHalves(
            lambda tx: scripts.send_lock_reads(tx, request.names),
            lambda tx, reads: scripts.slots.acquire(tx, request, reads=reads),
        )

    def _send(self, script: Script[T]) -> asyncio.Future[T]:
        """Hand ``script`` to the backend. It runs to its end even if the caller is cancelled
        while it is out (as the backends do anyway), and what it did can still be read; its
        errors are the driver's until :meth:`_answer` turns them."""
        return transactions.send(self.backend, script)

    async def _answer(self, sent: asyncio.Future[T]) -> T:
        """The outcome of a sent acquisition (or collection of a wait). If the caller is cancelled
        while it is out, the transaction is waited for and a lease it granted is released (its id
        would reach nobody) before the cancellation propagates."""
        try:
            return await asyncio.shield(sent)
        except asyncio.CancelledError:
            await _to_the_end(sent)
            if not sent.cancelled() and sent.exception() is None:
                await self._release_unclaimed(sent.result())
            raise
        except self.backend.unavailable as exc:
            raise transactions.unavailable(exc) from exc

    async def _release_unclaimed(self, outcome: object) -> None:
        """Release a grant that nobody will take (there is nothing to release without a lease,
        nor in a refusal)."""
        if isinstance(outcome, Granted) and outcome.lease_id is not None:
            await asyncio.shield(self._release(outcome.lease_id))

    async def _acquire_waiting(self, request: AcquireRequest) -> Granted:
        clock = self.scripts.clock
        started = clock()
        granted = await self._wait(request)
        if self.observer is not None:
            now = clock()
            handoff = None if granted.admitted is None else max(0.0, now - granted.admitted)
            self.observer.waited(granted, now - started, handoff)
        return granted

    async def _wait(self, request: AcquireRequest) -> Granted:
        if self._draining is not None:  # shutting down: no new wait (a detached one stays so)
            raise ShuttingDown(self._draining[0], request.rejoin)
        loop = asyncio.get_running_loop()
        self.waiters.listen(loop, self.backend)
        waiter_id = request.rejoin or str(uuid.uuid4())
        wake = Wake()
        if request.rejoin is None:
            # Registered before the request is queued: a grant may come before the queueing returns.
            self.waiters.register(waiter_id, wake)
        deadline = loop.time() + (request.wait or 0.0)
        queued = False  # a row of this request may be in the queue: leave it on the way out
        queue = self.scripts.queue
        try:
            sent: asyncio.Future[Outcome | None]
            if request.rejoin is None:
                sent = self._send(lambda tx: self.scripts.slots.acquire(tx, request, waiter_id))
            else:
                sent = self._send(lambda tx: queue.rejoin(tx, request, waiter_id))
            try:
                granted = await self._answer(sent)
            except asyncio.CancelledError:  # did the transaction out queue the request?
                queued = not sent.cancelled() and sent.exception() is None and sent.result() is None
                raise
            if granted is not None:
                return _granted(granted)
            queued = True
            if request.rejoin is not None:
                # Registered once the row is this process's again: what was granted in between
                # is on the row, so the first pass looks at it.
                self.waiters.register(waiter_id, wake)
                wake.event.set()
            self._start_heartbeat()
            if self._draining is not None:  # the shutdown began while it was being queued
                await self.detach_waiters(*self._draining)
            while (remaining := deadline - loop.time()) > 0:
                # Not wait_for: it may swallow a cancellation that comes with the wake-up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await wake.event.wait()
                if wake.granted is not None:  # handed over by the transaction that admitted it
                    queued = False
                    return wake.granted
                if wake.refused is not None:  # by the transaction that deleted one of its limits
                    queued = False
                    raise wake.refused
                if wake.detached:  # the server is shutting down: its row keeps its place
                    queued = False
                    raise ShuttingDown((self._draining or (SHUTDOWN_RETRY_AFTER,))[0], waiter_id)
                if not wake.event.is_set():
                    break  # out of time
                # Granted or refused by another process (the row says so), or told to look: look.
                wake.event.clear()
                polled = await self._answer(self._send(lambda tx: queue.poll(tx, waiter_id)))
                if polled is not None:
                    queued = False
                    return _granted(polled)
            # Out of time; a grant (or refusal) that raced the deadline is still taken.
            self.waiters.forget(waiter_id)  # a hand-off that arrives from now on is released
            queued = False
            if wake.granted is not None:
                return wake.granted
            if wake.refused is not None:
                raise wake.refused
            if wake.detached:  # detached as its time ran out: it keeps its place all the same
                raise ShuttingDown((self._draining or (SHUTDOWN_RETRY_AFTER,))[0], waiter_id)
            try:
                collected = await self._answer(self._send(lambda tx: queue.collect(tx, waiter_id)))
            except WaiterGone:
                raise SlotsUnavailable(None, "The wait was abandoned by the server; try again") from None
            if collected is not None:
                return _granted(collected)
            raise SlotsUnavailable(
                self.scripts.retry_policy.jitter(1.0), f"Timed out after waiting {request.wait:g} s for slots"
            )
        except asyncio.CancelledError:
            self.waiters.forget(waiter_id)  # a hand-off that arrives from now on is released
            await self._release_unclaimed(wake.granted)  # handed over, but the request is gone
            raise
        finally:
            self.waiters.forget(waiter_id)
            if queued:  # cancelled or failed while queued: leave the queue, holding nothing
                with contextlib.suppress(WaiterGone):  # gone: collected, or handed over
                    await asyncio.shield(
                        transactions.run(self.backend, lambda tx: queue.abandon(tx, waiter_id))
                    )

    async def detach_waiters(self, retry_after: float = SHUTDOWN_RETRY_AFTER, hold: float = 60.0) -> int:
        """The server is shutting down: answer every request of this process waiting in the queue
        with :class:`ShuttingDown` (503, ``Retry-After``, its waiter id), and every new waiting
        request from now on. Returns how many waiters were detached.

        A detached waiter keeps its row, and so its place in the queue, for ``hold`` seconds,
        owned by nobody (:data:`DETACHED`): admission may grant it meanwhile (the grant waits on
        the row, as for a waiter of another process). A retry that names it (``rejoin``), on any
        process of the database, takes that place back (``QueueScripts.rejoin``); if none comes,
        the sweeper drops it, and releases what it was granted. Leases are not touched.
        """
        self._draining = (retry_after, hold)
        ids = self.waiters.undecided()
        if not ids:
            return 0
        queue = self.scripts.queue
        detached = await asyncio.shield(
            transactions.run(self.backend, lambda tx: queue.detach(tx, ids, hold))
        )
        for waiter_id in detached:
            wake = self.waiters.forget(waiter_id)
            if wake is not None:
                wake.detached = True
                wake.event.set()
        return len(detached)

    def _start_heartbeat(self) -> None:
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="slotkeeper-waiters")

    async def _heartbeat(self) -> None:
        """While this process has waiters, tell the database it still holds their requests."""
        while self.waiters:
            await asyncio.sleep(WAITER_HEARTBEAT_SECONDS)
            try:
                await transactions.run(self.backend, self.scripts.queue.touch)
            except Exception as exc:  # the sweeper only acts after several misses: go on
                self.backend.supervisor.failure(HEARTBEAT, exc)  # logged, counted for readiness

    async def sweep(self) -> int:
        """Drop waiters whose request is gone (no heartbeat, or far past its deadline), and admit
        what fits on every queued limit (decay frees slots without any release). Returns how
        many waiters were dropped."""
        queue = self.scripts.queue
        ids = await transactions.run(self.backend, queue.abandoned)
        for waiter_id in ids:
            try:
                await transactions.run(self.backend, functools.partial(queue.abandon, waiter_id=waiter_id))
            except WaiterGone:
                pass
            except Exception:  # one waiter that cannot leave must not keep the others queued
                log.exception("could not drop abandoned waiter %s; retrying", waiter_id)
        await transactions.run(self.backend, queue.admit_everywhere)
        return len(ids)

    async def close(self) -> None:
        """Stop the heartbeat; finish releasing grants that nobody took."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        await self.waiters.close()
