"""Fans committed events out to live subscribers, each with a bounded queue.

The broker runs on the event loop. The storage backend hands it every committed batch, in
commit order (``Backend.subscribe``); the broker puts each event on the queue of every
subscriber whose predicate accepts it. Publishing never waits: a subscriber whose queue is full
is cut off (told why, and counted) so a slow reader can never slow acquisitions down.

A queue is full at ``queue_size`` events or ``queue_bytes`` bytes, whichever comes first: a count
alone let one stalled subscriber hold 10,000 events of 1.5 MB each. An event's bytes are
estimated (:func:`event_bytes`, about its JSON size) once per published batch, and only when
some subscriber accepts it, so a broker without subscribers costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson

from slotkeeper.events.models import EventRecord

log = logging.getLogger("slotkeeper.events")

#: Why a subscription ended, when the broker ended it: too many events queued, too many bytes.
OVERFLOWED = "overflowed"
OVERFLOWED_BYTES = "overflowed_bytes"
INTERRUPTED = "interrupted"
#: Ended by its reader (:meth:`Subscription.close`).
CLOSED = "closed"


#: What an event costs besides its labels and payload (its keys, ids and dates as JSON).
_EVENT_OVERHEAD = 256


def event_bytes(event: EventRecord) -> int:
    """About the size of ``event``'s JSON (its frame to a subscriber), for the queues' byte bound:
    the payload serialised, every label counted, a fixed overhead for the rest."""
    size = _EVENT_OVERHEAD + len(event.event) + len(orjson.dumps(event.payload))
    for resource in (event.resource, *event.related):
        size += sum(len(key) + len(value) + 6 for key, value in resource.items())
    return size


class Subscription:
    """One live subscriber: a queue of the events its predicate accepts, bounded by count and
    by bytes.

    :meth:`next` returns the next event, or ``None`` once the broker ended the subscription;
    ``ended`` then says why (:data:`OVERFLOWED`, :data:`OVERFLOWED_BYTES` or
    :data:`INTERRUPTED`).
    """

    def __init__(self, accepts: Callable[[EventRecord], bool], maxsize: int, maxbytes: int) -> None:
        self.accepts = accepts
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self.ended: str | None = None
        #: Estimated bytes of the events queued now (:func:`event_bytes`).
        self.queued_bytes = 0
        self._queue: asyncio.Queue[tuple[EventRecord, int] | None] = asyncio.Queue()

    def _offer(self, event: EventRecord, size: int) -> str | None:
        """Queue ``event``, or say which bound it would break (the reason to end on)."""
        if self._queue.qsize() >= self.maxsize:
            return OVERFLOWED
        if self.queued_bytes + size > self.maxbytes:
            return OVERFLOWED_BYTES
        self.queued_bytes += size
        self._queue.put_nowait((event, size))
        return None

    def _taken(self, item: tuple[EventRecord, int] | None) -> EventRecord | None:
        if item is None:
            return None
        self.queued_bytes -= item[1]
        return item[0]

    def _end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self._queue.put_nowait(None)  # wakes the reader; the queue bound excludes it

    def close(self) -> None:
        """End it from the reader's side (its client left): :meth:`next` returns None once the
        events already queued are read, and ``ended`` is :data:`CLOSED`."""
        self._end(CLOSED)

    def get_nowait(self) -> EventRecord | None:
        """The next queued event without waiting (``asyncio.QueueEmpty`` if none yet)."""
        return self._taken(self._queue.get_nowait())

    async def next(self) -> EventRecord | None:
        """The next accepted event, in commit order; ``None`` when the subscription ended."""
        if self.ended is not None and self._queue.empty():
            return None
        return self._taken(await self._queue.get())


class Broker:
    """Live fan-out of committed events. ``overflows`` counts subscribers cut off for lag.

    ``queue_size`` events or ``queue_bytes`` bytes (:func:`event_bytes`) queued for one
    subscriber, whichever comes first, cut it off.
    """

    def __init__(self, queue_size: int = 10_000, queue_bytes: int = 64 * 1024 * 1024) -> None:
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.overflows = 0
        self._subscriptions: set[Subscription] = set()

    @property
    def subscribers(self) -> int:
        """How many live subscribers there are."""
        return len(self._subscriptions)

    def subscribe(self, accepts: Callable[[EventRecord], bool]) -> Subscription:
        """Start receiving every event committed from now on that ``accepts`` keeps."""
        subscription = Subscription(accepts, self.queue_size, self.queue_bytes)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription`` (idempotent)."""
        self._subscriptions.discard(subscription)

    def publish(self, events: list[EventRecord] | None) -> None:
        """Deliver a committed batch; ``None`` means events may have been lost upstream."""
        if events is None:
            for subscription in list(self._subscriptions):
                subscription._end(INTERRUPTED)
                self.unsubscribe(subscription)
            return
        sizes: dict[int, int] = {}  # by position in the batch: each event is measured once
        for subscription in list(self._subscriptions):
            for index, event in enumerate(events):
                if not subscription.accepts(event):
                    continue
                size = sizes.get(index)
                if size is None:
                    size = sizes[index] = event_bytes(event)
                refused = subscription._offer(event, size)
                if refused is not None:
                    self.overflows += 1
                    log.warning(
                        "a live subscriber fell behind (more than %s queued) and was disconnected",
                        f"{subscription.maxsize} events"
                        if refused == OVERFLOWED
                        else f"{subscription.maxbytes} bytes",
                    )
                    subscription._end(refused)
                    self.unsubscribe(subscription)
                    break
