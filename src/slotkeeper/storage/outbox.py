"""The outbox: slotkeeper's own events waiting for the upstream Prefect server (gateway mode).

In gateway mode every transaction that writes server events also writes them to ``outbox``
(:func:`slotkeeper.storage.rows.write_events`, one more insert of the same rows, so an event is
queued if and only if it committed). :class:`OutboxStore` is what the delivery loop
(``gateway/outbox.py``) sees of it: the delivery lease (one deliverer per database at a time),
the oldest waiting events in commit order, their deletion once the upstream acknowledged them,
and the backlog. Each call is one short transaction; none of them touches a limit, a lease or a
waiter, so delivery never holds up an acquisition.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from slotkeeper.events.models import EventRecord
from slotkeeper.storage import backend as transactions
from slotkeeper.storage import queries as q
from slotkeeper.storage.backend import Backend
from slotkeeper.storage.tx import Tx


class Queued:
    """One event of the outbox: its place in commit order (``seq``) and the event itself, read
    from its row when first asked for (a pass reads a batch, but may deliver only its first rows
    while the next one waits for its run context)."""

    __slots__ = ("_event", "_row", "seq")

    def __init__(self, row: q.OutboxRow) -> None:
        self.seq = row.seq
        self._row = row
        self._event: EventRecord | None = None

    @property
    def event(self) -> EventRecord:
        """The event (parsed once)."""
        if self._event is None:
            row = self._row
            self._event = EventRecord(
                id=row.event_id,
                occurred=row.occurred,
                event=row.event,
                resource=orjson.loads(row.resource),
                related=orjson.loads(row.related),
                payload=orjson.loads(row.payload),
                follows=row.follows,
                received=row.occurred,
            )
        return self._event


@dataclass(frozen=True, slots=True)
class Backlog:
    """How many events wait for the upstream, and when the oldest of them occurred (None: none)."""

    events: int
    oldest: float | None


class OutboxStore:
    """The outbox over one backend: the delivery lease, reading, acknowledging, the backlog."""

    def __init__(self, backend: Backend, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock

    def enable(self) -> None:
        """From now on, every server event this process commits is queued in the outbox too."""
        self.backend.outbox = True

    async def claim(self, owner: str, seconds: float) -> bool:
        """Take or renew the delivery lease for ``seconds``: True if ``owner`` holds it now.

        Free, expired, or already ``owner``'s: taken. Held by another process: False (it
        delivers; this one stands by and asks again later).
        """
        now = self.clock()
        params = {"owner": owner, "expires": now + seconds, "now": now}
        row = await transactions.run(self.backend, lambda tx: tx.one(q.CLAIM_OUTBOX_LEASE, params))
        return row is not None

    async def free(self, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (another process may take it at once)."""
        await transactions.run(self.backend, lambda tx: tx.write(q.FREE_OUTBOX_LEASE, {"owner": owner}))

    async def oldest(self, batch: int) -> list[Queued]:
        """Up to ``batch`` waiting events, oldest first (commit order)."""

        def read(tx: Tx) -> list[Queued]:
            return [Queued(q.OutboxRow._make(r)) for r in tx.all(q.SELECT_OUTBOX, {"batch": batch})]

        return await transactions.read(self.backend, read)

    async def delivered(self, seqs: Sequence[int]) -> None:
        """The upstream acknowledged these events: forget them."""
        if seqs:
            await transactions.run(self.backend, lambda tx: tx.write(q.DELETE_OUTBOX, {"seqs": list(seqs)}))

    async def backlog(self) -> Backlog:
        """How many events wait, and when the oldest occurred."""

        def read(tx: Tx) -> Backlog:
            row = tx.one(q.SELECT_OUTBOX_BACKLOG)
            return Backlog(int(row[0]), row[1]) if row is not None else Backlog(0, None)

        return await transactions.read(self.backend, read)

    # --- client copies shared between processes (PostgreSQL) -----------------------------------

    async def share_copies(self, owner: str, copies: Sequence[str]) -> None:
        """Hand client copies (JSON) received by ``owner`` to whichever process delivers."""
        rows = [{"owner": owner, "copy": c} for c in copies]
        if rows:
            await transactions.run(self.backend, lambda tx: tx.write_many(q.INSERT_OUTBOX_COPY, rows))

    async def take_copies(self, owner: str, batch: int = 5000) -> list[str]:
        """The copies other processes shared, oldest first, deleted as they are taken."""

        def take(tx: Tx) -> list[str]:
            rows = tx.all(q.TAKE_OUTBOX_COPIES, {"owner": owner, "batch": batch})
            return [copy for _, copy in sorted(rows)]

        return await transactions.run(self.backend, take)
