"""Run context for slotkeeper's slot events, taken from Prefect's client copies of them.

Prefect's client emits its own copy of every slot event it causes (``prefect/concurrency/
_events.py`` and ``v1/_events.py`` in 3.8.8), and its events worker adds the run context it runs
in as related resources (``prefect/events/related.py``): the flow run, the task run, the flow,
the deployment, the work queue and pool, and their tags. slotkeeper's own event of the same
acquisition names only the limits and the holder the request named (``events/builders.py``).
In gateway mode the client's copy arrives on ``/api/events/in``, where it is dropped
(``events_in.py``: forwarding it would store every slot event twice, under two ids); before
that, its context is kept here, in memory and bounded, and the outbox (``outbox.py``) adds it to
slotkeeper's own event when it delivers it.

Matching. A copy has no lease id (Prefect's client does not put it in the event), so a copy is
matched to slotkeeper's event by what both name: the event, the limit (its id), the slots, and
the task run when slotkeeper's event names one (Prefect's task engine sends its task run as the
lease's holder; a v1 hold names it in the resource): then the match is exact. Without a holder
(``concurrency()`` in a task or flow), copies are paired in arrival order with slotkeeper's
events in commit order, within a window around the grant; when another copy of a different
context falls in the same window (two clients acquiring the same limit at once), only what their
contexts share is added. A released event takes the context of the acquired event it follows.

Everything here is pure state in memory: no I/O, a clock passed in.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from slotkeeper.events import builders
from slotkeeper.events.models import MAX_RELATED_RESOURCES, EventRecord

#: The roles of Prefect's run context (``related_resources_from_run_context``, 3.8.8).
CONTEXT_ROLES = frozenset({"flow-run", "task-run", "flow", "deployment", "work-queue", "work-pool", "tag"})
ACQUIRED_EVENTS = frozenset({builders.ACQUIRED, builders.V1_ACQUIRED})
_V2_PREFIX = "prefect.concurrency-limit."
_V1_PREFIX = "prefect.concurrency-limit.v1."
_TASK_RUN_PREFIX = "prefect.task-run."

#: A related resource: Prefect's flat string labels.
Resource = Mapping[str, str]
Context = tuple[Resource, ...]


def limit_id_of(resource: Mapping[str, Any]) -> str | None:
    """The limit id a slot event's resource names (``prefect.concurrency-limit[.v1].<id>``)."""
    rid = resource.get("prefect.resource.id")
    if not isinstance(rid, str):
        return None
    for prefix in (_V1_PREFIX, _V2_PREFIX):
        if rid.startswith(prefix):
            return rid[len(prefix) :] or None
    return None


def task_run_of(resource: Mapping[str, Any], related: Iterable[Mapping[str, Any]]) -> str | None:
    """The task run a slot event names: a v1 resource's ``task_run_id`` label, or the related
    resource of role ``task-run``."""
    v1 = resource.get("task_run_id")
    if isinstance(v1, str) and v1:
        return v1
    for r in related:
        rid = r.get("prefect.resource.id")
        if r.get("prefect.resource.role") == "task-run" and isinstance(rid, str):
            return rid.removeprefix(_TASK_RUN_PREFIX)
    return None


@dataclass(frozen=True, slots=True)
class ClientCopy:
    """What a client's copy of a slot event tells: which slot event it is, and its run context.

    ``seen`` is when the gateway received it, on the server's clock (the client's ``occurred``
    is on the client's, which may be skewed).
    """

    event: str
    limit_id: str
    slots: str | None
    task_run: str | None
    seen: float
    context: Context


def copy_json(copy: ClientCopy) -> str:
    """A copy as JSON, for another process (:func:`copy_from_json`)."""
    return orjson.dumps(
        {
            "event": copy.event,
            "limit_id": copy.limit_id,
            "slots": copy.slots,
            "task_run": copy.task_run,
            "seen": copy.seen,
            "context": copy.context,
        }
    ).decode()


def copy_from_json(text: str) -> ClientCopy:
    """The copy :func:`copy_json` wrote."""
    data = orjson.loads(text)
    return ClientCopy(
        event=data["event"],
        limit_id=data["limit_id"],
        slots=data["slots"],
        task_run=data["task_run"],
        seen=data["seen"],
        context=tuple(data["context"]),
    )


def client_copy(data: Mapping[str, Any], seen: float) -> ClientCopy | None:
    """The copy a client's event is, if it is a well-formed slot event; else None."""
    name = data.get("event")
    resource = data.get("resource")
    related = data.get("related") or []
    if name not in builders.SLOT_EVENTS or not isinstance(resource, Mapping) or not isinstance(related, list):
        return None
    limit_id = limit_id_of(resource)
    if limit_id is None:
        return None
    resources = [r for r in related if isinstance(r, Mapping) and all(isinstance(v, str) for v in r.values())]
    context = tuple(dict(r) for r in resources if r.get("prefect.resource.role") in CONTEXT_ROLES)
    slots = resource.get("slots-acquired")
    return ClientCopy(
        event=str(name),
        limit_id=limit_id,
        slots=slots if isinstance(slots, str) else None,
        task_run=task_run_of(resource, resources),
        seen=seen,
        context=context,
    )


def common(contexts: Sequence[Context]) -> Context:
    """The resources every one of ``contexts`` names, with the same labels (in the first's order)."""
    if not contexts:
        return ()
    first, rest = contexts[0], contexts[1:]
    return tuple(r for r in first if all(r in other for other in rest))


def enrich(related: Sequence[Resource], context: Context) -> list[dict[str, str]]:
    """slotkeeper's related resources with ``context`` added after them.

    A resource both name (the holder's task run) is the client's, which carries its name too.
    Capped at Prefect's maximum of related resources.
    """
    named = {r["prefect.resource.id"] for r in context}
    merged = [dict(r) for r in related if r.get("prefect.resource.id") not in named]
    merged.extend(dict(r) for r in context)
    return merged[:MAX_RELATED_RESOURCES]


class RunContexts:
    """The client copies seen lately, and the context given to each of slotkeeper's events.

    Bounded: at most ``size`` copies (the oldest go first) and ``size`` remembered contexts;
    a copy older than ``keep`` seconds is forgotten. ``wait``: how long after its grant a slot
    event may wait for its copy (the outbox holds it that long at most, see :meth:`resolve`).
    """

    def __init__(
        self,
        *,
        size: int = 10_000,
        wait: float = 1.5,
        keep: float = 60.0,
        early: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.size = size
        self.wait = wait
        self.keep = keep
        #: How far before slotkeeper's event a copy may have been seen (clocks of processes).
        self.early = early
        self.clock = clock
        self._copies: OrderedDict[tuple[str, str], deque[ClientCopy]] = OrderedDict()
        self._count = 0
        #: slotkeeper's event id -> the context it was given (released events follow acquired).
        self._given: OrderedDict[str, Context] = OrderedDict()
        #: Copies kept since start, and dropped unmatched (metrics, tests).
        self.seen = 0
        self.expired = 0
        #: Called after each copy is kept (the outbox's deliverer: an event may wait for it).
        self.on_copy: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self._count

    def add(self, copy: ClientCopy) -> None:
        """Keep a client copy until it is matched, too old, or pushed out by newer ones."""
        key = (copy.event, copy.limit_id)
        queue = self._copies.get(key)
        if queue is None:
            queue = self._copies[key] = deque()
        else:
            self._copies.move_to_end(key)
        queue.append(copy)
        self._count += 1
        self.seen += 1
        while self._count > self.size:
            oldest_key, oldest = next(iter(self._copies.items()))
            if oldest:
                oldest.popleft()
                self._count -= 1
                self.expired += 1
            if not oldest:
                del self._copies[oldest_key]
        if self.on_copy is not None:
            self.on_copy()

    def resolve(self, record: EventRecord, now: float | None = None) -> EventRecord | None:
        """``record`` as it goes to the upstream: with its run context when known; None while it
        should wait for its copy (a slot event younger than ``wait``, no copy yet).

        Idempotent: an event resolved before (a delivery retried) gets the same context again.
        """
        if record.event not in builders.SLOT_EVENTS:
            return record
        now = self.clock() if now is None else now
        given = self._given.get(record.id)
        if given is None and record.event not in ACQUIRED_EVENTS and record.follows:
            given = self._given.get(record.follows)
        if given is None:
            given = self._match(record, now, final=now - record.occurred >= self.wait)
            if given is None:
                return None
        self._remember(record.id, given)
        return replace(record, related=enrich(record.related, given)) if given else record

    def _remember(self, event_id: str, context: Context) -> None:
        self._given[event_id] = context
        self._given.move_to_end(event_id)
        while len(self._given) > self.size:
            self._given.popitem(last=False)

    def _match(self, record: EventRecord, now: float, *, final: bool) -> Context | None:
        """The context of ``record`` from the copies: () if none will come (``final``), None if
        one may still come."""
        limit_id = limit_id_of(record.resource)
        queue = self._copies.get((record.event, limit_id)) if limit_id else None
        if queue:
            self._forget_old(queue, now)
        slots = record.resource.get("slots-acquired")
        task_run = task_run_of(record.resource, record.related)
        lo, hi = record.occurred - self.early, record.occurred + self.wait
        candidates = [c for c in (queue or ()) if lo <= c.seen <= hi and c.slots == slots]
        if task_run is not None:
            candidates = [c for c in candidates if c.task_run == task_run]
        if not candidates:
            return () if final else None
        first = candidates[0]
        if queue is not None:
            queue.remove(first)
            self._count -= 1
        others = [c.context for c in candidates[1:] if c.context != first.context]
        return common([first.context, *others]) if others else first.context

    def _forget_old(self, queue: deque[ClientCopy], now: float) -> None:
        while queue and queue[0].seen < now - self.keep:
            queue.popleft()
            self._count -= 1
            self.expired += 1
