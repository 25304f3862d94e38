"""The filter of ``/api/events/in`` frames on their way to the upstream (gateway mode).

Prefect's client sends its events over one websocket: an ``auth`` message, then one JSON event
per text frame. Flow-run, task-run and every other event go on to the upstream unchanged (in
3.8.8 task runs exist on the server only through these events). Prefect's client copies of slot
events (``prefect.concurrency-limit.acquired`` / ``released`` and the v1 pair) are dropped:
slotkeeper delivers its own event of the same change through the outbox, with the same content
and its own id, so forwarding the copy would store every slot event twice. Before a copy is
dropped, its run context is kept (``context.py``) for the outbox to add to slotkeeper's event.

The filter never raises and never waits: a frame it cannot read goes on unchanged, and a frame
that cannot be a slot event is not even parsed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from slotkeeper.events import builders
from slotkeeper.gateway.context import ClientCopy, RunContexts, client_copy

log = logging.getLogger("slotkeeper.gateway.events_in")

#: Every slot event's name starts with it; a frame without it is forwarded unparsed.
_MARK = "prefect.concurrency-limit."


class SlotCopyFilter:
    """The ``/api/events/in`` frame filter: keeps the context of client copies of slot events
    and drops them; passes every other frame on as it came."""

    def __init__(
        self,
        contexts: RunContexts,
        clock: Callable[[], float] = time.time,
        share: Callable[[ClientCopy], None] | None = None,
    ) -> None:
        self.contexts = contexts
        self.clock = clock
        #: Told of every copy kept (the deliverer: another process may be the one delivering).
        self.share = share
        #: Client copies dropped since start.
        self.dropped = 0

    async def __call__(self, text: str) -> str | None:
        """The frame to forward (``text`` itself), or None to drop it."""
        if _MARK not in text:
            return text
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text  # not ours to judge: the upstream answers it as it would
        if not isinstance(data, dict) or data.get("event") not in builders.SLOT_EVENTS:
            return text
        try:
            copy = client_copy(data, self.clock())
            if copy is not None:
                self.contexts.add(copy)
                if self.share is not None:
                    self.share(copy)
        except Exception:  # a bug here must never cost the socket: drop the copy all the same
            log.exception("could not read the run context of a client's slot event")
        self.dropped += 1
        return None
