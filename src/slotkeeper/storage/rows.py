"""Between the records of :mod:`slotkeeper.domain` / :mod:`slotkeeper.models` and table rows.

Reading: a :class:`~slotkeeper.storage.queries.LimitRow` becomes a :class:`~slotkeeper.domain.Limit`.
Writing: a limit becomes the parameters of ``INSERT_LIMIT`` / ``UPDATE_LIMIT`` /
``UPDATE_LIMIT_SLOTS``, and events become the rows of ``events`` and ``event_resources``
(:func:`write_events`, shared by the transaction scripts and the event store).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from slotkeeper.domain import Limit
from slotkeeper.events.filters import search_text
from slotkeeper.events.models import EventRecord
from slotkeeper.models import Holder, LeaseInfo
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Row
from slotkeeper.storage.tx import Tx


def limit_rows(rows: Iterable[Row]) -> list[q.LimitRow]:
    """The rows of a ``SELECT {LIMIT_COLUMNS}`` statement, by column name."""
    return [q.LimitRow._make(row) for row in rows]


def limit_from(r: q.LimitRow, leased: int) -> Limit:
    """The limit a ``limits`` row holds, with ``leased`` slots held by live leases."""
    return Limit(
        id=r.id,
        name=r.name,
        limit=r.slot_limit,
        active=bool(r.active),
        pool_slots=r.pool_slots,
        pool_clock=r.pool_clock,
        denied_slots=r.denied_slots,
        slot_decay_per_second=r.slot_decay_per_second,
        avg_slot_occupancy_seconds=r.avg_slot_occupancy_seconds,
        fencing_token=r.fencing_token,
        created=r.created,
        updated=r.updated,
        pool_event_id=r.pool_event_id,
        leased_slots=leased,
    )


def holder_of(holder_type: str | None, holder_id: str | None) -> Holder | None:
    """The holder a lease row names, if it names one."""
    return Holder(holder_type, holder_id) if holder_type is not None and holder_id is not None else None


def lease_infos(rows: Iterable[Row]) -> list[LeaseInfo]:
    """The live leases of ``SELECT_LIMIT_LEASES`` rows."""
    return [
        LeaseInfo(
            lease_id=r.id,
            holder=holder_of(r.holder_type, r.holder_id),
            slots=r.slots,
            created=r.created,
            expires=r.expires,
            fencing_token=r.fencing_token,
        )
        for r in map(q.LimitLeaseRow._make, rows)
    ]


def limit_params(lim: Limit) -> dict[str, Any]:
    """Every column of a limit (``INSERT_LIMIT``, ``UPDATE_LIMIT``)."""
    return {
        "id": lim.id,
        "name": lim.name,
        "slot_limit": lim.limit,
        "active": lim.active,
        "created": lim.created,
        "updated": lim.updated,
        "pool_slots": lim.pool_slots,
        "pool_clock": lim.pool_clock,
        "denied_slots": lim.denied_slots,
        "slot_decay_per_second": lim.slot_decay_per_second,
        "avg_slot_occupancy_seconds": lim.avg_slot_occupancy_seconds,
        "fencing_token": lim.fencing_token,
        "pool_event_id": lim.pool_event_id,
    }


def slots_params(lim: Limit, now: float) -> dict[str, Any]:
    """What an acquisition or a plain decrement writes back (``UPDATE_LIMIT_SLOTS``)."""
    return {
        "id": lim.id,
        "pool_slots": lim.pool_slots,
        "pool_clock": lim.pool_clock,
        "fencing_token": lim.fencing_token,
        "updated": now,
        "pool_event_id": lim.pool_event_id,
    }


def write_events(tx: Tx, events: Sequence[EventRecord], *, dedupe: bool = False) -> list[EventRecord]:
    """Insert events and their related resources in ``tx``; return those inserted.

    With ``dedupe`` (client events) an id already stored inserts nothing, so each row goes in at
    once. Without (server-written events, fresh UUIDv7 ids), the rows go through
    :meth:`Tx.insert_at_commit`: on SQLite, inserted with those of the whole group just before its
    commit. Inserted events are queued on ``tx.events`` for publication after the commit.
    """
    rows = [
        {
            "id": e.id,
            "occurred": e.occurred,
            "received": e.received,
            "event": e.event,
            "resource_id": e.resource_id,
            "resource": orjson.dumps(e.resource).decode(),
            "related": orjson.dumps(e.related).decode(),
            "payload": orjson.dumps(e.payload).decode(),
            "follows": e.follows,
            "search": search_text(e),
        }
        for e in events
    ]
    # Client events go in at once (an id already stored is skipped); the server's are fresh.
    insert = tx.write_many if dedupe else tx.insert_at_commit
    if dedupe:
        written = [e for e, row in zip(events, rows, strict=True) if tx.one(q.INSERT_EVENT_IF_NEW, row)]
    else:
        insert(q.INSERT_EVENT, rows)
        if tx.outbox:
            insert(q.INSERT_OUTBOX, rows)
        written = list(events)
    related = [
        {
            "event_id": e.id,
            "position": i,
            "occurred": e.occurred,
            "resource_id": r["prefect.resource.id"],
            "role": r["prefect.resource.role"],
            "labels": orjson.dumps(r).decode(),
        }
        for e in written
        for i, r in enumerate(e.related)
    ]
    if related:
        insert(q.INSERT_EVENT_RESOURCE, related)
    tx.events.extend(written)
    return written
