"""Fans committed events out to live subscribers, each with a bounded queue.

The broker runs on the event loop. The storage backend hands it every committed batch, in
commit order (``Backend.subscribe``); the broker puts each event on the queue of every
subscriber whose predicate accepts it. Publishing never waits: a subscriber whose queue is full
is cut off (told why, and counted) so a slow reader can never slow acquisitions down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from slotkeeper.events.models import EventRecord

log = logging.getLogger("slotkeeper.events")

#: Why a subscription ended, when the broker ended it.
OVERFLOWED = "overflowed"
INTERRUPTED = "interrupted"
#: Ended by its reader (:meth:`Subscription.close`).
CLOSED = "closed"


class Subscription:
    """One live subscriber: a bounded queue of the events its predicate accepts.

    :meth:`next` returns the next event, or ``None`` once the broker ended the subscription;
    ``ended`` then says why (:data:`OVERFLOWED` or :data:`INTERRUPTED`).
    """

    def __init__(self, accepts: Callable[[EventRecord], bool], maxsize: int) -> None:
        self.accepts = accepts
        self.maxsize = maxsize
        self.ended: str | None = None
        self._queue: asyncio.Queue[EventRecord | None] = asyncio.Queue()

    def _offer(self, event: EventRecord) -> bool:
        if self._queue.qsize() >= self.maxsize:
            return False
        self._queue.put_nowait(event)
        return True

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
        return self._queue.get_nowait()

    async def next(self) -> EventRecord | None:
        """The next accepted event, in commit order; ``None`` when the subscription ended."""
        if self.ended is not None and self._queue.empty():
            return None
        return await self._queue.get()


class Broker:
    """Live fan-out of committed events. ``overflows`` counts subscribers cut off for lag."""

    def __init__(self, queue_size: int = 10_000) -> None:
        self.queue_size = queue_size
        self.overflows = 0
        self._subscriptions: set[Subscription] = set()

    @property
    def subscribers(self) -> int:
        """How many live subscribers there are."""
        return len(self._subscriptions)

    def subscribe(self, accepts: Callable[[EventRecord], bool]) -> Subscription:
        """Start receiving every event committed from now on that ``accepts`` keeps."""
        subscription = Subscription(accepts, self.queue_size)
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
        for subscription in list(self._subscriptions):
            for event in events:
                if subscription.accepts(event) and not subscription._offer(event):
                    self.overflows += 1
                    log.warning(
                        "a live subscriber fell %d events behind and was disconnected",
                        subscription.maxsize,
                    )
                    subscription._end(OVERFLOWED)
                    self.unsubscribe(subscription)
                    break
