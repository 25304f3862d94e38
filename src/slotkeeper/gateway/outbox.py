"""Delivery of the outbox to the upstream Prefect server (gateway mode).

Every slot and lifecycle event slotkeeper commits is queued in the outbox by the transaction
that writes it (``storage/outbox.py``). One :class:`Deliverer` per server process sends them to
the upstream and deletes what the upstream acknowledged:

* **One deliverer per database at a time.** A process delivers while it holds the outbox's
  lease (renewed every third of ``lease_seconds``); the others stand by and take over once it
  has expired (a process that stops frees it at once). So events go out in commit order, and
  two PostgreSQL processes never send the same events side by side.
* **At least once, with the same ids.** A batch is deleted only once the upstream answered it
  2xx; anything else (unreachable, timeout, 5xx) leaves it queued and it is sent again, under
  the same ids, after a backoff (doubling up to ``max_backoff``). A batch refused as such (400,
  413, 422: its size or an event in it) is split in halves until the event refused is alone,
  which is then dropped from the outbox with an error line (it stays in slotkeeper's store):
  resending it could never succeed, and it would hold every event behind it. Prefect's server stores an
  event id once: its publisher drops an id it has seen in the last 5 minutes
  (``server/utilities/messaging/memory.py``, ``deduplicate_by="id"``), and its persister inserts
  with ``ON CONFLICT DO NOTHING`` on PostgreSQL and skips stored ids on SQLite
  (``server/events/storage/database.py``), so a batch sent twice is stored once.
* **Over HTTP, not the events websocket.** ``POST /api/events`` (Prefect's "record a batch of
  events") answers 204 once the server has taken the batch; ``/api/events/in`` answers nothing,
  and a frame written to a socket that then breaks may or may not have been read, so a websocket
  sender could only guess what to send again.
* **Run context.** A slot event waits up to ``RunContexts.wait`` after its grant for the client
  copy that names its run (``context.py``), then goes with what is known. On PostgreSQL a copy
  received by a process that does not deliver is handed over through ``outbox_copies``. The stream stays in
  commit order, so one waiting event holds those behind it for that long at most.
* **Never in the way of an acquisition.** Delivery only reads and deletes outbox rows (no limit,
  lease or waiter), one short transaction each, from one task; it restarts itself (and says so
  in the log) if a bug ever stops it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson

from slotkeeper.errors import DatabaseUnavailable
from slotkeeper.events.models import EventRecord, iso
from slotkeeper.gateway.context import ClientCopy, RunContexts, copy_from_json, copy_json
from slotkeeper.gateway.events_in import SlotCopyFilter
from slotkeeper.gateway.ws import FRAME_FILTERS
from slotkeeper.settings import Settings
from slotkeeper.storage.outbox import OutboxStore
from slotkeeper.supervisor import Supervisor

if TYPE_CHECKING:
    from slotkeeper.storage.core import Storage

log = logging.getLogger("slotkeeper.gateway.outbox")


#: The delivery loop's name for the storage's supervisor (slotkeeper.supervisor).
OUTBOX_LOOP = "outbox"

#: What may end a deliverer's wait early: new events committed, a client copy seen.
COMMIT, COPY = "commit", "copy"


class DeliveryFailed(Exception):
    """The upstream did not take a batch (unreachable, timed out, or answered other than 2xx).

    ``status``: the upstream's answer, None if there was none.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


#: Answers that refuse the batch itself (its size, an event in it), not the moment: sending the
#: same batch again cannot succeed, so it is split until the event refused is alone.
REFUSED = frozenset({400, 413, 422})


class Upstream(Protocol):
    """Where the events go: ``send`` returns once the upstream took them, raises
    :class:`DeliveryFailed` otherwise."""

    async def send(self, events: Sequence[EventRecord]) -> None: ...


def wire(event: EventRecord) -> dict[str, Any]:
    """An event as a client sends it to Prefect (``received`` is the upstream's to set)."""
    return {
        "occurred": iso(event.occurred),
        "event": event.event,
        "resource": event.resource,
        "related": event.related,
        "payload": event.payload,
        "id": event.id,
        "follows": event.follows,
    }


class EventsEndpoint:
    """The upstream's ``POST {upstream}/events``, over one aiohttp session of its own."""

    def __init__(self, upstream_url: str, *, timeout: float = 10.0, auth_string: str | None = None) -> None:
        self.url = upstream_url.rstrip("/") + "/events"
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.headers = {"Content-Type": "application/json"}
        if auth_string:
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
        self._session: aiohttp.ClientSession | None = None

    async def send(self, events: Sequence[EventRecord]) -> None:
        """POST the batch; :class:`DeliveryFailed` unless the upstream answers 2xx."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        body = orjson.dumps([wire(e) for e in events])
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as answer:
                if answer.status // 100 != 2:
                    text = (await answer.text())[:300]
                    raise DeliveryFailed(f"{self.url} answered {answer.status}: {text}", answer.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryFailed(f"{self.url} unreachable: {exc!r}") from exc

    async def close(self) -> None:
        """Close the session (its connections)."""
        if self._session is not None:
            await self._session.close()


@dataclass
class DeliveryStats:
    """What one process's deliverer did since start (metrics, logs, tests)."""

    delivered: int = 0
    batches: int = 0
    failures: int = 0
    restarts: int = 0
    #: Events the upstream refused for good (400/413/422 for the event alone), dropped.
    refused: int = 0
    #: Seconds from the last delivered event's commit to its acknowledgement.
    lag: float = 0.0
    #: Whether this process holds the delivery lease now.
    delivering: bool = False


class Deliverer:
    """Sends the outbox to the upstream, in commit order, while this process holds its lease."""

    def __init__(
        self,
        store: OutboxStore,
        upstream: Upstream,
        contexts: RunContexts,
        *,
        owner: str | None = None,
        batch: int = 500,
        lease_seconds: float = 15.0,
        idle_seconds: float = 1.0,
        max_backoff: float = 30.0,
        restart_seconds: float = 1.0,
        coalesce: float = 0.02,
        pace: float = 0.05,
        share_copies: bool = False,
        supervisor: Supervisor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.contexts = contexts
        self.owner = owner or str(uuid.uuid4())
        self.batch = batch
        #: The batch of the next pass: smaller while a refused batch is being split.
        self._batch = batch
        self.lease_seconds = lease_seconds
        self.idle_seconds = idle_seconds
        self.max_backoff = max_backoff
        self.restart_seconds = restart_seconds
        self.clock = clock
        self.stats = DeliveryStats()
        self._renew_at = 0.0
        self.coalesce = coalesce
        #: Shortest wait before the next pass while an event waits for its context (a copy
        #: arriving ends it sooner).
        self.pace = pace
        #: Several processes (PostgreSQL): copies received while another process delivers are
        #: handed to it through the database (``outbox_copies``).
        self.share_copies = share_copies
        #: The storage's supervisor of background loops: a bug that stops delivery is reported
        #: there (``/api/ready``); an upstream that is down is not a bug and is not.
        self.supervisor = supervisor
        self._shared: list[str] = []
        self._sharing: asyncio.Task[None] | None = None
        self._wakes = {COMMIT: asyncio.Event(), COPY: asyncio.Event()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_pending = False
        #: Sleeping until new events are committed (the only time a commit needs to wake it).
        self._idle = False
        #: Commits seen (any thread), and at the start of the last pass.
        self._commits = 0
        self._commits_at_pass = 0

    # --- wake-ups -------------------------------------------------------------------------------

    def committed(self, _events: object = None) -> None:
        """Events were committed (any thread): an idle deliverer delivers soon. One wake-up
        scheduled at a time, and none while the deliverer is busy or waits for a context (it
        reads the outbox again anyway): under load, commits cost nothing here."""
        self._commits += 1  # no lock: a lost increment only means one more pass
        if not self._idle or self._wake_pending or self._loop is None:
            return
        self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._set_committed)

    def _set_committed(self) -> None:
        self._wake_pending = False
        self._wakes[COMMIT].set()

    def copied(self) -> None:
        """A client copy arrived (on the loop): an event held for its run context may go now."""
        self._wakes[COPY].set()

    async def _sleep(self, seconds: float, wake_on: str | None) -> None:
        """Sleep ``seconds``, or less if ``wake_on`` happens meanwhile; then a short pause
        (``coalesce``), so that a burst of wake-ups costs one pass."""
        if wake_on is None:
            await asyncio.sleep(seconds)
            return
        wake = self._wakes[wake_on]  # cleared by the pass, before it read anything
        if wake_on == COMMIT and self._commits != self._commits_at_pass:
            return  # events committed while the pass ran: no sleep
        self._idle = wake_on == COMMIT
        try:
            async with asyncio.timeout(seconds):  # in this task: no task of its own (wait_for's)
                await wake.wait()
        except TimeoutError:
            return
        finally:
            self._idle = False
        await asyncio.sleep(self.coalesce)

    # --- client copies for the delivering process ---------------------------------------------

    def received(self, copy: ClientCopy) -> None:
        """A client copy was kept here (on the loop): if another process delivers, hand it over
        (batched: one insert per ``coalesce`` at most)."""
        if not self.share_copies or self.stats.delivering:
            return
        self._shared.append(copy_json(copy))
        if self._sharing is None or self._sharing.done():
            self._sharing = asyncio.get_running_loop().create_task(self._share())

    async def _share(self) -> None:
        await asyncio.sleep(self.coalesce)
        copies, self._shared = self._shared, []
        try:
            await self.store.share_copies(self.owner, copies)
        except Exception as exc:  # their events go without context; delivery itself is unharmed
            log.warning("could not hand %d client copies to the delivering process: %s", len(copies), exc)

    # --- one pass -------------------------------------------------------------------------------

    async def deliver(self) -> tuple[float, str | None]:
        """One pass: hold the lease, send what is ready, delete it. Returns how long to wait
        before the next pass, and what may end that wait early: :data:`COMMIT` (idle: new
        events), :data:`COPY` (an event waits for its run context: a client copy), or None.

        Raises :class:`DeliveryFailed` or :class:`DatabaseUnavailable` (nothing was deleted).
        """
        for wake in self._wakes.values():  # what happens from now on ends the next wait early
            wake.clear()
        self._commits_at_pass = self._commits
        now = self.clock()
        if not self.stats.delivering or now >= self._renew_at:
            self.stats.delivering = await self.store.claim(self.owner, self.lease_seconds)
            self._renew_at = now + self.lease_seconds / 3
        if not self.stats.delivering:
            return self.lease_seconds / 3, None  # another process delivers; stand by
        if self.share_copies:  # the copies other processes received, before matching
            for text in await self.store.take_copies(self.owner):
                self.contexts.add(copy_from_json(text))
        queued = await self.store.oldest(self._batch)
        ready: list[EventRecord] = []
        for item in queued:
            event = self.contexts.resolve(item.event, now)
            if event is None:  # waits for its run context; so do those behind it (order)
                break
            ready.append(event)
        if ready:
            try:
                await self.upstream.send(ready)
            except DeliveryFailed as exc:
                if exc.status not in REFUSED:
                    raise
                if len(ready) > 1:  # split: the next pass sends the first half alone
                    self._batch = max(len(ready) // 2, 1)
                    raise
                # One event the upstream refuses, whatever its moment: it stays in slotkeeper's own
                # store, but delivering it would hold every event behind it forever.
                log.error(
                    "the upstream refused event %s (%s) for good; dropped from the outbox: %s",
                    ready[0].id,
                    ready[0].event,
                    exc,
                )
                self.stats.refused += 1
                await self.store.delivered([queued[0].seq])
                self._batch = self.batch
                return 0.0, None
            await self.store.delivered([item.seq for item in queued[: len(ready)]])
            self._batch = min(self._batch * 2, self.batch)
            done = self.clock()
            self.stats.delivered += len(ready)
            self.stats.batches += 1
            self.stats.lag = max(done - ready[-1].occurred, 0.0)
        if len(ready) < len(queued):  # the next one waits for its context, until its deadline
            head = queued[len(ready)].event
            # Not sooner than ``pace``: the events behind it are held for their own contexts
            # too, and a pass per event would read the whole batch each time.
            return max(head.occurred + self.contexts.wait - self.clock(), self.pace), COPY
        if queued and len(queued) == self._batch:
            return 0.0, None  # more behind: at once
        return self.idle_seconds, COMMIT

    # --- the task -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until cancelled; restart after a bug (logged); free the lease at the end."""
        self._loop = asyncio.get_running_loop()
        self.contexts.on_copy = self.copied
        try:
            while True:
                try:
                    await self._deliver_forever()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats.restarts += 1
                    if self.supervisor is not None:  # logged, counted, and seen by /api/ready
                        delay = self.supervisor.failure(OUTBOX_LOOP, exc)
                    else:
                        log.exception("outbox delivery stopped on an unexpected error; restarting it")
                        delay = self.restart_seconds
                    await asyncio.sleep(delay)
        finally:
            if self._sharing is not None:
                self._sharing.cancel()
            if self.stats.delivering:
                self.stats.delivering = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.store.free(self.owner), 2.0)

    async def _deliver_forever(self) -> None:
        backoff = 0.0
        failing_since: float | None = None
        while True:
            try:
                delay, wake_on = await self.deliver()
            except (DeliveryFailed, DatabaseUnavailable) as exc:
                self.stats.failures += 1
                backoff = min(max(backoff * 2, 0.5), self.max_backoff)
                if failing_since is None:
                    failing_since = self.clock()
                    log.warning(
                        "events cannot be delivered to the upstream (%s); retrying, every %.1f s at most",
                        exc,
                        self.max_backoff,
                    )
                else:
                    log.debug("outbox delivery still failing: %s", exc)
                delay, wake_on = backoff, None
            else:
                if failing_since is not None:
                    log.info(
                        "events are delivered to the upstream again, after %.1f s",
                        self.clock() - failing_since,
                    )
                    failing_since, backoff = None, 0.0
            if delay > 0:
                await self._sleep(delay, wake_on)


# --- wiring (the app's lifespan) ----------------------------------------------------------------------

#: The relayed websocket whose frames :class:`~slotkeeper.gateway.events_in.SlotCopyFilter` sees.
EVENTS_IN = "/api/events/in"


@dataclass
class Delivery:
    """Gateway mode's events in one process: the outbox's deliverer (its task) and the filter of
    ``/api/events/in`` that feeds it run contexts."""

    deliverer: Deliverer
    copies: SlotCopyFilter
    endpoint: EventsEndpoint
    task: asyncio.Task[None]
    unsubscribe: Callable[[], None]

    async def stop(self) -> None:
        """Stop delivering (the lease is freed for another process), unregister the filter."""
        if FRAME_FILTERS.get(EVENTS_IN) is self.copies:
            del FRAME_FILTERS[EVENTS_IN]
        self.unsubscribe()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.endpoint.close()


def start_delivery(storage: Storage, settings: Settings) -> Delivery:
    """Queue this process's events in the outbox from now on, filter ``/api/events/in``, and
    start delivering to ``settings.upstream_url`` (on the running loop)."""
    if not settings.upstream_url:
        raise ValueError("the outbox delivers to an upstream: SLOTKEEPER_UPSTREAM_URL is not set")
    clock = storage.clock  # the clock of the events' ``occurred``: ages and matching agree with it
    contexts = RunContexts(
        size=settings.outbox_context_entries, wait=settings.outbox_context_wait_seconds, clock=clock
    )
    outbox = storage.outbox_store()
    outbox.enable()
    endpoint = EventsEndpoint(
        settings.upstream_url,
        timeout=settings.upstream_timeout_seconds,
        auth_string=settings.upstream_auth_string,
    )
    deliverer = Deliverer(
        outbox,
        endpoint,
        contexts,
        batch=settings.outbox_batch_size,
        lease_seconds=settings.outbox_lease_seconds,
        max_backoff=settings.outbox_max_backoff_seconds,
        share_copies=storage.backend.name != "sqlite",  # SQLite: one process, it delivers
        supervisor=storage.supervisor,
        clock=clock,
    )
    copies = SlotCopyFilter(contexts, clock=clock, share=deliverer.received)
    unsubscribe = storage.subscribe_events(deliverer.committed)
    FRAME_FILTERS[EVENTS_IN] = copies
    task = asyncio.create_task(deliverer.run(), name="slotkeeper-outbox")
    return Delivery(deliverer, copies, endpoint, task, unsubscribe)
