"""Storage: every state change is one transaction script, run by a backend.

Each public coroutine sends one private ``_op`` to the backend, which runs it inside one
transaction (SQLite: one writer thread with group commit; PostgreSQL: a pool of connections).
An op loads and locks what it needs, asks :mod:`slotkeeper.domain` what to do, and writes the
result; the slot change, the lease rows and the event rows commit together or not at all.
Events an op writes are also appended to ``tx.events``; the backend publishes them to live
subscribers after the commit, in commit order (see ``Backend.subscribe``).

Lock order, the same in every op so PostgreSQL never deadlocks: limit rows first, by id
(``ORDER BY id FOR UPDATE``), then lease rows. ``now`` is read after the locks are held, so two
ops on the same limit see increasing times in commit order (this is what makes renewal and
expiry race-free: see ``_renew``).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import orjson

from slotkeeper import domain
from slotkeeper.domain import Limit, Mode, RetryPolicy
from slotkeeper.errors import Conflict, NotFound
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import (
    AcquireRequest,
    Granted,
    Holder,
    LeaseInfo,
    LimitSpec,
    LimitView,
)
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Row, Tx

T = TypeVar("T")

LIMIT_NOT_FOUND = "Concurrency Limit not found"


class Backend(Protocol):
    """Runs a transaction script: commits its writes if it returns, rolls back if it raises."""

    name: str

    async def run(self, op: Callable[[Tx], T]) -> T: ...

    async def close(self) -> None: ...

    def subscribe(self, callback: Callable[[list[EventRecord] | None], None]) -> None:
        """Deliver every committed event, in commit order, to ``callback`` (from any thread).

        ``None`` means events may have been missed (a lost database connection): live
        subscribers must start again from the store.
        """


def _limit(row: Row, leased: int) -> Limit:
    return Limit(
        id=row[0],
        name=row[1],
        limit=row[2],
        active=bool(row[3]),
        pool_slots=row[4],
        pool_clock=row[5],
        denied_slots=row[6],
        slot_decay_per_second=row[7],
        avg_slot_occupancy_seconds=row[8],
        fencing_token=row[9],
        created=row[10],
        updated=row[11],
        pool_event_id=row[12],
        leased_slots=leased,
    )


def _holder(kind: str | None, ident: str | None) -> Holder | None:
    return Holder(kind, ident) if kind is not None and ident is not None else None


def _search_text(event: EventRecord) -> str:
    parts = [event.event, *event.resource.values()]
    for related in event.related:
        parts.extend(related.values())
    parts.append(orjson.dumps(event.payload).decode())
    return " ".join(parts).lower()


def write_events(tx: Tx, events: Sequence[EventRecord], *, dedupe: bool = False) -> list[EventRecord]:
    """Insert events and their related resources in ``tx``; return those inserted.

    With ``dedupe`` (client events) an id already stored inserts nothing. Inserted events are
    queued on ``tx.events`` for publication after the commit.
    """
    written: list[EventRecord] = []
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
            "search": _search_text(e),
        }
        for e in events
    ]
    if dedupe:
        written = [e for e, row in zip(events, rows, strict=True) if tx.one(q.INSERT_EVENT_IF_NEW, row)]
    else:
        tx.many(q.INSERT_EVENT, rows)
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
        tx.many(q.INSERT_EVENT_RESOURCE, related)
    tx.events.extend(written)
    return written


def _limit_params(lim: Limit) -> dict[str, Any]:
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


def _slots_params(lim: Limit, now: float) -> dict[str, Any]:
    return {
        "id": lim.id,
        "pool_slots": lim.pool_slots,
        "pool_clock": lim.pool_clock,
        "fencing_token": lim.fencing_token,
        "updated": now,
        "pool_event_id": lim.pool_event_id,
    }


class Storage:
    """The one storage interface; the backend decides where the transactions run."""

    def __init__(
        self,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.retry_policy = retry_policy or RetryPolicy()

    async def close(self) -> None:
        """Finish pending work and close every connection."""
        await self.backend.close()

    # --- reading helpers (run inside ops) -------------------------------------------------------

    def _with_leased(self, tx: Tx, rows: Sequence[Row], now: float) -> list[Limit]:
        if not rows:
            return []
        sums: dict[str, int] = dict(tx.all(q.SELECT_LEASED_SLOTS, {"ids": [r[0] for r in rows], "now": now}))
        return [_limit(r, int(sums.get(r[0], 0))) for r in rows]

    def _find(self, tx: Tx, key: str) -> tuple[Limit, float]:
        """The limit with this id or name, locked; and ``now``. Ids are tried for UUID keys."""
        query = q.SELECT_LIMIT_BY_ID if domain.looks_like_uuid(key) else q.SELECT_LIMIT_BY_NAME
        row = tx.one(query, {"key": key})
        if row is None:
            raise NotFound(LIMIT_NOT_FOUND)
        now = self.clock()
        return self._with_leased(tx, [row], now)[0], now

    def _by_names(self, tx: Tx, names: Sequence[str]) -> tuple[list[Limit], float]:
        """The named limits that exist, locked, in request order; and ``now``."""
        unique = list(dict.fromkeys(names))
        rows = tx.all(q.SELECT_LIMITS_BY_NAMES, {"names": unique}) if unique else []
        now = self.clock()
        by_name = {lim.name: lim for lim in self._with_leased(tx, rows, now)}
        return [by_name[n] for n in unique if n in by_name], now

    # --- limits ---------------------------------------------------------------------------------

    async def create_limit(self, spec: LimitSpec) -> LimitView:
        """Create a limit; :class:`Conflict` if the name is taken."""
        return await self.backend.run(lambda tx: self._create(tx, spec))

    def _create(self, tx: Tx, spec: LimitSpec) -> LimitView:
        now = self.clock()
        lim = Limit(
            id=str(uuid.uuid4()),
            name=spec.name,
            limit=spec.limit,
            active=spec.active,
            pool_slots=spec.active_slots,
            pool_clock=now,
            leased_slots=0,
            slot_decay_per_second=spec.slot_decay_per_second,
            denied_slots=spec.denied_slots,
            avg_slot_occupancy_seconds=domain.DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS,
            fencing_token=0,
            created=now,
            updated=now,
        )
        try:
            tx.run(q.INSERT_LIMIT, _limit_params(lim))
        except tx.integrity_error:
            raise Conflict(f"A concurrency limit named {spec.name!r} already exists.") from None
        write_events(tx, [builders.lifecycle_event(builders.CREATED, lim, now)])
        return LimitView(lim, spec.active_slots)

    async def read_limit(self, key: str) -> LimitView:
        """The limit with this id or name; :class:`NotFound` if none."""
        return await self.backend.run(lambda tx: self._read(tx, key))

    def _read(self, tx: Tx, key: str) -> LimitView:
        lim, now = self._find(tx, key)
        return LimitView(lim, lim.occupied(now))

    async def list_limits(self, limit: int, offset: int, prefix: str | None = None) -> list[LimitView]:
        """A page of limits ordered by name, optionally only names starting with ``prefix``."""
        return await self.backend.run(lambda tx: self._list(tx, limit, offset, prefix))

    def _list(self, tx: Tx, limit: int, offset: int, prefix: str | None) -> list[LimitView]:
        if prefix is None:
            rows = tx.all(q.SELECT_LIMITS_PAGE, {"limit": limit, "offset": offset})
        else:
            like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = tx.all(
                q.SELECT_LIMITS_PAGE_WITH_PREFIX, {"prefix": like, "limit": limit, "offset": offset}
            )
        now = self.clock()
        return [LimitView(lim, lim.occupied(now)) for lim in self._with_leased(tx, rows, now)]

    async def update_limit(self, key: str, changes: dict[str, Any]) -> LimitView:
        """Apply the given fields; decay up to now is kept, not discarded as Prefect does."""
        return await self.backend.run(lambda tx: self._update(tx, key, changes))

    def _update(self, tx: Tx, key: str, changes: dict[str, Any]) -> LimitView:
        lim, now = self._find(tx, key)
        lim = lim.settled(now)
        fields = {k: v for k, v in changes.items() if k != "active_slots"}
        if "limit" in fields:
            fields["limit"] = int(fields["limit"])
        lim = replace(lim, **fields, updated=now)
        if changes.get("active_slots") is not None:
            lim = domain.set_active_slots(lim, changes["active_slots"], now)
        try:
            tx.run(q.UPDATE_LIMIT, _limit_params(lim))
        except tx.integrity_error:
            raise Conflict(f"A concurrency limit named {lim.name!r} already exists.") from None
        write_events(tx, [builders.lifecycle_event(builders.UPDATED, lim, now)])
        return LimitView(lim, lim.occupied(now))

    async def delete_limit(self, key: str) -> LimitView:
        """Delete a limit; its grants go with it (their leases stay for their other limits)."""
        return await self.backend.run(lambda tx: self._delete(tx, key))

    def _delete(self, tx: Tx, key: str) -> LimitView:
        lim, now = self._find(tx, key)
        settled = lim.settled(now)
        # Every holder loses its slots on this limit: one released event per live grant, and one
        # for unleased slots that would not come back by decay.
        batches: dict[str, tuple[list[str], Row]] = {}
        for row in tx.all(q.SELECT_LIMIT_GRANTS, {"id": lim.id, "now": now}):
            batches.setdefault(row[0], ([], row))[0].append(row[5])
        released = [
            builders.slot_event(
                builders.RELEASED,
                lim,
                slots=row[1],
                batch=batch,
                occurred=now,
                holder=_holder(row[3], row[4]),
                follows=row[2],
            )
            for batch, row in batches.values()
        ]
        if settled.pool_slots and lim.slot_decay_per_second <= 0:
            released.append(
                builders.slot_event(
                    builders.RELEASED,
                    lim,
                    slots=settled.pool_slots,
                    batch=[lim.id],
                    occurred=now,
                    follows=lim.pool_event_id,
                )
            )
        tx.run(q.DELETE_LIMIT_GRANTS, {"id": lim.id})
        tx.run(q.DELETE_LIMIT, {"id": lim.id})
        write_events(tx, [*released, builders.lifecycle_event(builders.DELETED, lim, now)])
        return LimitView(lim, lim.occupied(now))

    # --- slots ----------------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> Granted:
        """Take slots on every named limit or none: :class:`SlotsUnavailable` when full."""
        return await self.backend.run(lambda tx: self._acquire(tx, request))

    def _acquire(self, tx: Tx, request: AcquireRequest) -> Granted:
        found, now = self._by_names(tx, request.names)
        lease = request.lease
        if not found:
            # Nothing to hold: Prefect still answers with a lease id. It is not stored, since
            # no slot depends on it; renewing it answers 410, releasing it 204.
            return Granted([], str(uuid.uuid4()) if lease else None)
        decision = domain.decide_acquire(
            found,
            request.slots,
            request.mode,
            leased=lease is not None,
            now=now,
            retry_after=self.retry_policy,
        )
        holder = lease.holder if lease else None
        batch = [lim.id for lim in decision.limits]
        acquired = [
            builders.slot_event(
                builders.ACQUIRED, lim, slots=request.slots, batch=batch, occurred=now, holder=holder
            )
            for lim in decision.limits
        ]
        written = decision.limits
        if lease is None and request.mode is Mode.CONCURRENCY:
            # Unleased slots: a later plain decrement's released event follows this one.
            written = [
                replace(lim, pool_event_id=event.id)
                for lim, event in zip(decision.limits, acquired, strict=True)
            ]
        tx.many(q.UPDATE_LIMIT_SLOTS, [_slots_params(lim, now) for lim in written])
        write_events(tx, acquired)
        if lease is None:
            return Granted(written, None)
        lease_id = str(uuid.uuid4())
        tx.run(
            q.INSERT_LEASE,
            {
                "id": lease_id,
                "created": now,
                "expires": now + lease.duration,
                "slots": request.slots,
                "holder_type": holder.type if holder else None,
                "holder_id": holder.id if holder else None,
            },
        )
        if request.mode is Mode.CONCURRENCY:
            # Rate-limit slots come back by decay: such a lease holds no grant and releases nothing.
            tx.many(
                q.INSERT_GRANT,
                [
                    {
                        "lease_id": lease_id,
                        "limit_id": lim.id,
                        "slots": decision.grant_slots.get(lim.id, 0),
                        "fencing_token": lim.fencing_token,
                        "acquired_event_id": event.id,
                    }
                    for lim, event in zip(written, acquired, strict=True)
                ],
            )
        return Granted(written, lease_id)

    async def release_slots(
        self, names: list[str], slots: int, occupancy_seconds: float | None
    ) -> list[Limit]:
        """Plain ``/decrement``: free unleased slots on each active named limit (clamped at 0)."""
        return await self.backend.run(lambda tx: self._release_slots(tx, names, slots, occupancy_seconds))

    def _release_slots(
        self, tx: Tx, names: list[str], slots: int, occupancy_seconds: float | None
    ) -> list[Limit]:
        found, now = self._by_names(tx, names)
        batch = [lim.id for lim in found]
        changed: list[tuple[Limit, float]] = []
        released: list[EventRecord] = []
        for lim in found:
            if not lim.active:
                continue
            new = domain.release_pool(lim, slots, now)
            avg = new.avg_slot_occupancy_seconds
            if occupancy_seconds:
                avg = domain.next_avg_occupancy(avg, occupancy_seconds, slots, new.limit)
            changed.append((new, avg))
            freed = lim.settled(now).pool_slots - new.pool_slots
            if freed:
                released.append(
                    builders.slot_event(
                        builders.RELEASED,
                        new,
                        slots=freed,
                        batch=batch,
                        occurred=now,
                        follows=lim.pool_event_id,
                    )
                )
        tx.many(q.UPDATE_LIMIT_SLOTS, [_slots_params(new, now) for new, _ in changed])
        tx.many(q.UPDATE_LIMIT_AVG, [{"id": new.id, "avg": avg} for new, avg in changed])
        write_events(tx, released)
        return found

    async def release_lease(self, lease_id: str) -> bool:
        """Release a lease and every slot it holds. False if it was already gone."""
        return await self.backend.run(lambda tx: self._end_lease(tx, lease_id, expired_only=False))

    def _lock_lease_limits(self, tx: Tx, lease_id: str) -> tuple[list[Limit], dict[str, str], float]:
        """Lock the limits of a lease (by id); return them, their acquired event ids, and now."""
        grants: dict[str, str] = dict(tx.all(q.SELECT_LEASE_GRANTS, {"id": lease_id}))
        rows = tx.all(q.SELECT_LIMITS_BY_IDS, {"ids": list(grants)}) if grants else []
        now = self.clock()
        return [_limit(r, 0) for r in rows], grants, now

    def _end_lease(self, tx: Tx, lease_id: str, *, expired_only: bool) -> bool:
        limits, grants, now = self._lock_lease_limits(tx, lease_id)
        if expired_only:
            row = tx.one(q.DELETE_LEASE_IF_EXPIRED, {"id": lease_id, "now": now})
        else:
            row = tx.one(q.DELETE_LEASE, {"id": lease_id})
        if row is None:
            return False
        created, expires, slots, holder_type, holder_id = row
        tx.run(q.DELETE_LEASE_GRANTS, {"id": lease_id})
        ended = min(now, expires)  # an expired lease gave its slots back at its expiry
        held = ended - created
        tx.many(
            q.UPDATE_LIMIT_AVG,
            [
                {
                    "id": lim.id,
                    "avg": domain.next_avg_occupancy(lim.avg_slot_occupancy_seconds, held, slots, lim.limit),
                }
                for lim in limits
                if lim.active and held > 0
            ],
        )
        holder = _holder(holder_type, holder_id)
        batch = [lim.id for lim in limits]
        write_events(
            tx,
            [
                builders.slot_event(
                    builders.RELEASED,
                    lim,
                    slots=slots,
                    batch=batch,
                    occurred=ended,
                    holder=holder,
                    follows=grants.get(lim.id),
                )
                for lim in limits
            ],
        )
        return True

    async def renew_lease(self, lease_id: str, duration: float) -> bool:
        """Extend a live lease to now + duration. False if it expired or is gone (410)."""
        return await self.backend.run(lambda tx: self._renew(tx, lease_id, duration))

    def _end_expired(self, tx: Tx, lease_id: str) -> bool:
        return self._end_lease(tx, lease_id, expired_only=True)

    def _renew(self, tx: Tx, lease_id: str, duration: float) -> bool:
        # The limits are locked first and ``now`` read after: an acquisition that already
        # counted this lease as expired has committed, so ``now`` here is past the expiry and
        # the compare-and-set refuses. A lease renewed in time is never reclaimed.
        _, _, now = self._lock_lease_limits(tx, lease_id)
        return tx.run(q.RENEW_LEASE, {"id": lease_id, "expires": now + duration, "now": now}) == 1

    async def list_leases(self, key: str) -> list[LeaseInfo]:
        """The live leases on one limit, oldest first."""
        return await self.backend.run(lambda tx: self._list_leases(tx, key))

    def _list_leases(self, tx: Tx, key: str) -> list[LeaseInfo]:
        lim, now = self._find(tx, key)
        return [
            LeaseInfo(
                lease_id=r[0],
                holder=Holder(r[1], r[2]) if r[1] is not None else None,
                slots=r[3],
                created=r[4],
                expires=r[5],
                fencing_token=r[6],
            )
            for r in tx.all(q.SELECT_LIMIT_LEASES, {"id": lim.id, "now": now})
        ]

    async def reap_expired(self, batch: int = 500) -> int:
        """End up to ``batch`` expired leases, exactly once each; return how many ended.

        Each lease ends in its own transaction under the usual lock order (SQLite commits them
        together anyway). A lease renewed or released meanwhile is skipped by the conditional
        delete, and a reaper in another process finds nothing left to delete.
        """
        ids = await self.backend.run(
            lambda tx: [r[0] for r in tx.all(q.SELECT_EXPIRED_LEASES, {"now": self.clock(), "batch": batch})]
        )
        ended = await asyncio.gather(
            *(self.backend.run(functools.partial(self._end_expired, lease_id=i)) for i in ids)
        )
        return sum(ended)


__all__ = ["Backend", "Mode", "Storage"]
