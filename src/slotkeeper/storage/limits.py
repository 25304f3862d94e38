"""Limit scripts: create, read, list, update and delete limits (see ``scripts.py``).

A change that may let waiters in (a larger or re-activated limit, a deleted one whose waiters
also waited for other limits) ends with admission (``QueueScripts.admit``), in its transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from slotkeeper import domain
from slotkeeper.domain import Limit
from slotkeeper.errors import Conflict
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import LimitSpec, LimitView
from slotkeeper.storage import queries as q
from slotkeeper.storage.rows import holder_of, limit_params, write_events
from slotkeeper.storage.tx import Tx

if TYPE_CHECKING:
    from slotkeeper.storage.scripts import Scripts


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A concurrency limit named {name!r} already exists.", code="name_taken")


class LimitScripts:
    """The limit scripts of one :class:`~slotkeeper.storage.scripts.Scripts`."""

    def __init__(self, scripts: Scripts) -> None:
        self.s = scripts

    def create(self, tx: Tx, spec: LimitSpec) -> LimitView:
        """Create a limit; :class:`Conflict` if the name is taken."""
        domain.check_active_slots(spec.active_slots, spec.limit)
        now = self.s.clock()
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
            tx.write_now(q.INSERT_LIMIT, limit_params(lim))
        except tx.integrity_error:
            raise _name_taken(spec.name) from None
        write_events(tx, [builders.lifecycle_event(builders.CREATED, lim, now)])
        return LimitView(lim, spec.active_slots)

    def read(self, tx: Tx, key: str) -> LimitView:
        """The limit with this id or name (locked, as every lookup); :class:`NotFound` if none."""
        lim, now = self.s.lock_limit(tx, key)
        return LimitView(lim, lim.occupied(now))

    def page(self, tx: Tx, limit: int, offset: int, prefix: str | None) -> list[LimitView]:
        """A page of limits ordered by name, optionally only names starting with ``prefix``."""
        if prefix is None:
            rows = tx.all(q.SELECT_LIMITS_PAGE, {"limit": limit, "offset": offset})
        else:
            rows = tx.all(
                q.SELECT_LIMITS_PAGE_WITH_PREFIX, {"prefix": prefix, "limit": limit, "offset": offset}
            )
        now = self.s.clock()
        return [LimitView(lim, lim.occupied(now)) for lim in self.s.with_leased(tx, rows, now)]

    def update(self, tx: Tx, key: str, changes: dict[str, Any]) -> LimitView:
        """Apply the given fields; decay up to now is kept, not discarded as Prefect does."""
        lim, now = self.s.lock_limit(tx, key)
        lim = lim.settled(now)
        fields = {k: v for k, v in changes.items() if k != "active_slots"}
        if "limit" in fields:
            fields["limit"] = int(fields["limit"])
        lim = replace(lim, **fields, updated=now)
        if changes.get("active_slots") is not None:
            lim = domain.set_active_slots(lim, changes["active_slots"], now)
        try:
            tx.write_now(q.UPDATE_LIMIT, limit_params(lim))
        except tx.integrity_error:
            raise _name_taken(lim.name) from None
        write_events(tx, [builders.lifecycle_event(builders.UPDATED, lim, now)])
        self.s.queue.admit(tx, [lim.id])  # a larger or re-activated limit may let waiters in
        return LimitView(lim, lim.occupied(now))

    def delete(self, tx: Tx, key: str) -> LimitView:
        """Delete a limit; its grants go with it (their leases stay for their other limits)."""
        lim, now = self.s.lock_limit(tx, key)
        released, leases = self.take_back(tx, lim, now)
        # Its waiters are refused; the queues of the other limits they waited for move on.
        others = [r[0] for r in tx.all(q.SELECT_CO_WAITED_LIMITS, {"id": lim.id})]
        self.s.queue.refuse_waiters(tx, lim)
        tx.write_now(q.DELETE_LIMIT_GRANTS, {"id": lim.id})
        if leases:  # a v1 hold of this limit alone can never be released by its task run now
            tx.write_now(q.DELETE_EMPTY_V1_LEASES, {"ids": leases})
        tx.write_now(q.DELETE_LIMIT, {"id": lim.id})
        write_events(tx, [*released, builders.lifecycle_event(builders.DELETED, lim, now)])
        self.s.queue.admit(tx, others)
        return LimitView(lim, lim.occupied(now))

    def take_back(
        self, tx: Tx, lim: Limit, now: float, cause: str = builders.DELETION
    ) -> tuple[list[EventRecord], list[str]]:
        """Everything this limit has out, as it is taken back (deleted, or a v1 reset: ``cause``):
        the released events, and the leases holding a grant on it.

        One released event per grant (a grant whose lease expired but was not reaped yet ended
        at the expiry), and one for unleased slots that would not come back by decay and were
        acquired with an event (slots an operator set have none to follow).
        """
        batches: dict[str, tuple[list[str], q.LimitGrantRow]] = {}
        for row in map(q.LimitGrantRow._make, tx.all(q.SELECT_LIMIT_GRANTS, {"id": lim.id})):
            batches.setdefault(row.lease_id, ([], row))[0].append(row.limit_id)
        released = [
            replace(
                builders.released_event(
                    row.kind,
                    lim,
                    slots=row.slots,
                    batch=batch,
                    occurred=min(now, row.expires),
                    holder=holder_of(row.holder_type, row.holder_id),
                    follows=row.acquired_event_id,
                ),
                received=now,
                cause=cause,
            )
            for batch, row in batches.values()
        ]
        pool = lim.settled(now).pool_slots
        if pool and lim.slot_decay_per_second <= 0 and lim.pool_event_id:
            released.append(
                replace(
                    builders.slot_event(
                        builders.RELEASED,
                        lim,
                        slots=pool,
                        batch=[lim.id],
                        occurred=now,
                        follows=lim.pool_event_id,
                    ),
                    cause=cause,
                )
            )
        return released, list(batches)
