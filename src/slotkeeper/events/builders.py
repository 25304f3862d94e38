"""The events the server writes: the slot events with the resources and labels Prefect's client
emits (``prefect/concurrency/_events.py`` and ``prefect/concurrency/v1/_events.py`` in Prefect
3.8.8), and slotkeeper's own lifecycle events (see docs/events.md).

Pure functions: storage calls them inside the transaction that makes the change, so an event
exists if and only if its change committed.
"""

from __future__ import annotations

from collections.abc import Sequence

import uuid_utils

from slotkeeper.domain import TAG_PREFIX as TAG_PREFIX  # the builders' callers name tags with it
from slotkeeper.domain import Limit
from slotkeeper.events.models import EventRecord
from slotkeeper.models import Holder

ACQUIRED = "prefect.concurrency-limit.acquired"
RELEASED = "prefect.concurrency-limit.released"
V1_ACQUIRED = "prefect.concurrency-limit.v1.acquired"
V1_RELEASED = "prefect.concurrency-limit.v1.released"
CREATED = "prefect.concurrency-limit.created"
UPDATED = "prefect.concurrency-limit.updated"
DELETED = "prefect.concurrency-limit.deleted"

#: Slot events the server records itself; copies sent by clients are acknowledged, not stored.
SLOT_EVENTS = frozenset({ACQUIRED, RELEASED, V1_ACQUIRED, V1_RELEASED})

#: How a grant ended (``EventRecord.cause`` of its released events): released by its holder (or
#: for it, by the server, when the request that was granted had left), expired (the reaper),
#: its limit deleted, its tag limit reset (v1), ended by an operator.
RELEASE, EXPIRY, DELETION, RESET, OPERATOR = "release", "expiry", "deletion", "reset", "operator"
ENDED_BY = (RELEASE, EXPIRY, DELETION, RESET, OPERATOR)


def new_event_id() -> str:
    """A UUIDv7: time-ordered, as Prefect's server-side event ids."""
    return str(uuid_utils.uuid7())


def limit_resource_id(limit_id: str) -> str:
    """``prefect.concurrency-limit.<uuid>``."""
    return f"prefect.concurrency-limit.{limit_id}"


def holder_resource(holder: Holder) -> dict[str, str]:
    """The holder as a related resource, as Prefect's run context names it (``task-run``...)."""
    kind = holder.type.replace("_", "-")
    return {"prefect.resource.id": f"prefect.{kind}.{holder.id}", "prefect.resource.role": kind}


def slot_event(
    name: str,
    limit: Limit,
    *,
    slots: int,
    batch: Sequence[str],
    occurred: float,
    holder: Holder | None = None,
    follows: str | None = None,
    payload: dict[str, object] | None = None,
    received: float | None = None,
    cause: str | None = None,
) -> EventRecord:
    """An acquired or released event for one limit of a batch.

    ``batch`` is the ids of every limit of the same acquisition; each other one becomes a related
    resource with role ``concurrency-limit``. The holder, when known, is related too. ``payload``
    is empty (as Prefect's) unless the server has something to add: :func:`waited_payload`,
    :func:`ended_payload`. ``received`` is ``occurred`` unless given; ``cause``: see
    ``EventRecord.cause``.
    """
    related = [
        {"prefect.resource.id": limit_resource_id(other), "prefect.resource.role": "concurrency-limit"}
        for other in batch
        if other != limit.id
    ]
    if holder is not None:
        related.append(holder_resource(holder))
    return EventRecord(
        id=new_event_id(),
        occurred=occurred,
        event=name,
        resource={
            "prefect.resource.id": limit_resource_id(limit.id),
            "prefect.resource.name": limit.name,
            "slots-acquired": str(slots),
            "limit": str(limit.limit),
        },
        related=related,
        payload=payload or {},
        follows=follows,
        received=occurred if received is None else received,
        cause=cause,
    )


#: Payload key of an acquired event whose grant waited in the server-side queue: how long (s).
WAITED_SECONDS = "waited_seconds"
#: Payload key of a released event that says why its lease ended, when it was not its holder.
REASON = "reason"
#: The causes a released event states in its payload (``reason``): an operator's end
#: (``DELETE /api/v2/concurrency_limits/leases/{id}``). The others are Prefect's plain events.
STATED_CAUSES = frozenset({OPERATOR})


def waited_payload(waited: float) -> dict[str, object]:
    """The payload of an acquired event granted from the queue: the seconds its request waited
    there (a grant made at once has an empty payload: it waited 0 s)."""
    return {WAITED_SECONDS: round(max(waited, 0.0), 6)}


def ended_payload(reason: str | None) -> dict[str, object]:
    """The payload of a released event: ``{"reason": reason}``, or empty without one."""
    return {REASON: reason} if reason else {}


#: The ``kind`` of a lease that is a tag-based (v1) hold: its slot events are the v1 pair.
V1_HOLD = "v1"


def v1_limit_resource_id(limit_id: str) -> str:
    """``prefect.concurrency-limit.v1.<uuid>``."""
    return f"prefect.concurrency-limit.v1.{limit_id}"


def v1_slot_event(
    name: str,
    limit: Limit,
    *,
    batch: Sequence[str],
    occurred: float,
    task_run_id: str,
    follows: str | None = None,
    payload: dict[str, object] | None = None,
    received: float | None = None,
    cause: str | None = None,
) -> EventRecord:
    """A v1 acquired or released event for one tag limit of a v1 hold (one slot each).

    The resource is named by the tag (the limit name without ``tag:``), as Prefect's v1 client
    names it; each other limit of the same increment is related with role ``concurrency-limit``.
    ``received`` and ``cause`` as in :func:`slot_event`.
    """
    related = [
        {"prefect.resource.id": v1_limit_resource_id(other), "prefect.resource.role": "concurrency-limit"}
        for other in batch
        if other != limit.id
    ]
    return EventRecord(
        id=new_event_id(),
        occurred=occurred,
        event=name,
        resource={
            "prefect.resource.id": v1_limit_resource_id(limit.id),
            "prefect.resource.name": limit.name.removeprefix(TAG_PREFIX),
            "limit": str(limit.limit),
            "task_run_id": task_run_id,
        },
        related=related,
        payload=payload or {},
        follows=follows,
        received=occurred if received is None else received,
        cause=cause,
    )


def released_event(
    kind: str | None,
    limit: Limit,
    *,
    slots: int,
    batch: Sequence[str],
    occurred: float,
    holder: Holder | None,
    follows: str | None,
    reason: str | None = None,
    received: float | None = None,
    cause: str | None = None,
) -> EventRecord:
    """The released event of one grant of a lease of this ``kind`` (v1 holds get the v1 event);
    ``reason`` says why the lease ended when its holder did not end it (:data:`OPERATOR`).
    ``received`` and ``cause`` as in :func:`slot_event`."""
    if kind == V1_HOLD:
        return v1_slot_event(
            V1_RELEASED,
            limit,
            batch=batch,
            occurred=occurred,
            task_run_id=holder.id if holder else "",
            follows=follows,
            payload=ended_payload(reason),
            received=received,
            cause=cause,
        )
    return slot_event(
        RELEASED,
        limit,
        slots=slots,
        batch=batch,
        occurred=occurred,
        holder=holder,
        follows=follows,
        payload=ended_payload(reason),
        received=received,
        cause=cause,
    )


def lifecycle_event(name: str, limit: Limit, occurred: float) -> EventRecord:
    """A created, updated or deleted event, with the limit's state as payload."""
    return EventRecord(
        id=new_event_id(),
        occurred=occurred,
        event=name,
        resource={
            "prefect.resource.id": limit_resource_id(limit.id),
            "prefect.resource.name": limit.name,
        },
        related=[],
        payload={
            "name": limit.name,
            "limit": limit.limit,
            "active": limit.active,
            "slot_decay_per_second": limit.slot_decay_per_second,
        },
        received=occurred,
    )
