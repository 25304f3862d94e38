"""Tag-based (v1) concurrency limits: the transaction scripts behind ``/api/concurrency_limits``.

A tag limit *is* the global limit named ``tag:<tag>`` (as in Prefect since 3.4.19): the same row,
the same occupancy rule, the same wait queue, the same lifecycle events. What v1 adds is the
*hold*:

* a v1 increment takes one slot on every named tag, all or nothing, and records it as **one
  lease** of kind ``'v1'`` held by ``{type: task_run, id: task_run_id}``, with one grant per tag;
* v1 clients cannot renew, so the hold lasts ``hold_ttl`` seconds (Prefect: 100 years; the
  ``SLOTKEEPER_V1_HOLD_TTL_SECONDS`` setting makes abandoned holds expire, and the ordinary reaper
  then ends them);
* a v1 decrement ends the holds of that task run that hold any of the named tags;
* the slot events of a hold are the v1 pair (``prefect.concurrency-limit.v1.acquired`` /
  ``.released``), written in the transaction of the change, whatever ends the hold: decrement,
  reset, deletion of the limit, expiry, or a v2 release by lease id (``SlotScripts.end_lease``
  and ``LimitScripts.take_back`` build them from the lease's ``kind``).

The scripts below run over :class:`~slotkeeper.storage.scripts.Scripts` (its lookups, with their
lock order, and the limit, slot and queue scripts) inside their own transactions, so v1 and v2
changes to the same limit serialise exactly as v2 changes do. The decisions are
:func:`slotkeeper.domain.check_tag_hold` and :func:`slotkeeper.domain.decide_tag_hold`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from slotkeeper import domain
from slotkeeper.domain import TAG_PREFIX, Limit
from slotkeeper.errors import Conflict, NotFound
from slotkeeper.events import builders
from slotkeeper.models import LimitSpec, TagLimitView
from slotkeeper.storage import backend as transactions
from slotkeeper.storage import queries as q
from slotkeeper.storage.dialect import Row
from slotkeeper.storage.rows import slots_params, write_events
from slotkeeper.storage.scripts import Scripts
from slotkeeper.storage.tx import Tx

if TYPE_CHECKING:
    from slotkeeper.storage.core import Storage

__all__ = [
    "DEFAULT_V1_HOLD_TTL_SECONDS",
    "TAG_PREFIX",
    "V1_NOT_FOUND",
    "TagScripts",
    "TagStore",
    "tag_name",
]

#: Prefect's v1 not-found message (lower-case ``l``, unlike v2's).
V1_NOT_FOUND = "Concurrency limit not found"
#: How long a v1 hold lasts unless configured: Prefect's ``V1_LEASE_TTL`` (about 100 years).
DEFAULT_V1_HOLD_TTL_SECONDS = 100 * 365 * 86400.0


def tag_name(tag: str) -> str:
    """The name of the limit behind a tag: ``tag:<tag>``."""
    return TAG_PREFIX + tag


class TagScripts:
    """The v1 transaction scripts over one :class:`Scripts`; ``hold_ttl`` is the lifetime of a
    v1 hold."""

    def __init__(self, scripts: Scripts, hold_ttl: float) -> None:
        self.s = scripts
        self.hold_ttl = hold_ttl

    # --- locking lookups ------------------------------------------------------------------------

    def _tag_limit(self, tx: Tx, row: Row | None) -> tuple[Limit, float]:
        if row is None or not q.LimitRow._make(row).name.startswith(TAG_PREFIX):
            raise NotFound(V1_NOT_FOUND)
        now = self.s.clock()
        return self.s.with_leased(tx, [row], now)[0], now

    def lock_tag(self, tx: Tx, tag: str) -> tuple[Limit, float]:
        """The limit of this tag, locked, and ``now``; :class:`NotFound` (v1 message) if none."""
        return self._tag_limit(tx, tx.one(q.SELECT_LIMIT_BY_NAME, {"key": tag_name(tag)}))

    def lock_tag_limit(self, tx: Tx, limit_id: str) -> tuple[Limit, float]:
        """The tag limit with this id, locked, and ``now``; a limit not named ``tag:`` is not one."""
        return self._tag_limit(tx, tx.one(q.SELECT_LIMIT_BY_ID, {"key": limit_id}))

    def views(self, tx: Tx, limits: Sequence[Limit], now: float) -> list[TagLimitView]:
        """Each limit with the task runs holding it now, in acquisition order, each once."""
        holders: dict[str, list[str]] = {lim.id: [] for lim in limits}
        if limits:
            rows = tx.all(q.SELECT_TASK_RUN_HOLDERS, {"ids": list(holders), "now": now})
            for limit_id, task_run_id in rows:
                if task_run_id not in holders[limit_id]:
                    holders[limit_id].append(task_run_id)
        return [TagLimitView(lim, holders[lim.id]) for lim in limits]

    def view(self, tx: Tx, found: tuple[Limit, float]) -> TagLimitView:
        """The view of one limit found by a lookup."""
        lim, now = found
        return self.views(tx, [lim], now)[0]

    # --- limits ---------------------------------------------------------------------------------

    def upsert(self, tx: Tx, tag: str, limit: int) -> tuple[TagLimitView, bool]:
        """Create the tag's limit or set its ``limit``; the view, and whether it was created."""
        name = tag_name(tag)
        created = tx.one(q.SELECT_LIMIT_BY_NAME, {"key": name}) is None
        if created:
            view = self.s.limits.create(tx, LimitSpec(name, limit))
        else:
            view = self.s.limits.update(tx, name, {"limit": limit})
        return self.views(tx, [view.limit], self.s.clock())[0], created

    def page(self, tx: Tx, limit: int, offset: int) -> list[TagLimitView]:
        """A page of tag limits only, ordered by tag."""
        views = self.s.limits.page(tx, limit, offset, TAG_PREFIX)
        return self.views(tx, [v.limit for v in views], self.s.clock())

    def reset(self, tx: Tx, tag: str, slot_override: Sequence[str]) -> None:
        """Free every slot of the tag, then give one slot to each task run of ``slot_override``
        (see :meth:`TagStore.reset`)."""
        lim, now = self.lock_tag(tx, tag)
        settled = lim.settled(now)
        released, leases = self.s.limits.take_back(tx, lim, now, builders.RESET)
        if leases:
            tx.write_now(q.DELETE_LIMIT_GRANTS, {"id": lim.id})
            tx.write_now(q.DELETE_EMPTY_V1_LEASES, {"ids": leases})
        cleared = replace(settled, pool_slots=0, pool_clock=now, pool_event_id=None, leased_slots=0)
        if settled.pool_slots:
            tx.write_now(q.UPDATE_LIMIT_SLOTS, slots_params(cleared, now))
        write_events(tx, released)
        for task_run_id in dict.fromkeys(slot_override):
            cleared = replace(cleared, fencing_token=cleared.fencing_token + 1)
            self.hold(tx, [cleared], {cleared.id: 1 if cleared.active else 0}, task_run_id, now)
        self.s.queue.admit(tx, [lim.id])  # freed slots go to the head of the queue

    # --- slots ----------------------------------------------------------------------------------

    def acquire(self, tx: Tx, tags: Sequence[str], task_run_id: str) -> list[Limit]:
        """v1 increment (see :meth:`TagStore.acquire`)."""
        found, now = self.s.lock_limits_named(tx, [tag_name(t) for t in tags])
        domain.check_tag_hold(found)
        active = [lim for lim in found if lim.active]
        if not active:
            return []
        queued: dict[str, int] = dict(tx.all(q.SELECT_QUEUED_SLOTS, {"ids": [lim.id for lim in active]}))
        decision = domain.decide_tag_hold(active, queued, now, self.s.retry_policy)
        self.hold(tx, decision.limits, decision.grant_slots, task_run_id, now)
        return decision.limits

    def hold(
        self, tx: Tx, written: list[Limit], grant_slots: dict[str, int], task_run_id: str, now: float
    ) -> None:
        """Record one v1 hold of ``task_run_id`` on ``written`` (limits as they must be stored, with
        their new fencing tokens): v1 acquired events, the lease, one grant per limit."""
        batch = [lim.id for lim in written]
        acquired = [
            builders.v1_slot_event(
                builders.V1_ACQUIRED, lim, batch=batch, occurred=now, task_run_id=task_run_id
            )
            for lim in written
        ]
        self.s.slots.write_acquired(tx, written, acquired, now)
        lease_id = str(uuid.uuid4())
        tx.write_now(
            q.INSERT_V1_LEASE,
            {"id": lease_id, "created": now, "expires": now + self.hold_ttl, "holder_id": task_run_id},
        )
        self.s.slots.write_grants(tx, lease_id, written, grant_slots, acquired)

    def end_holds(self, tx: Tx, tags: Sequence[str], task_run_id: str) -> list[Limit]:
        """v1 decrement (see :meth:`TagStore.release`)."""
        names = [tag_name(t) for t in dict.fromkeys(tags)]
        if not names:
            return []
        holds = [r[0] for r in tx.all(q.SELECT_V1_HOLDS_OF, {"names": names, "holder_id": task_run_id})]
        if holds:
            # Every limit these holds touch, locked in id order before any is changed.
            tx.all(q.LOCK_LIMITS_OF_HOLDS, {"names": names, "leases": holds})
        found, _ = self.s.lock_limits_named(tx, names)
        for lease_id in holds:
            self.s.slots.end_lease(tx, lease_id)
        return found


class TagStore:
    """The v1 operations over one :class:`Storage`; ``hold_ttl`` is the lifetime of a v1 hold."""

    def __init__(self, storage: Storage, hold_ttl: float | None = None) -> None:
        self.backend = storage.backend
        self.scripts = TagScripts(
            storage.scripts, DEFAULT_V1_HOLD_TTL_SECONDS if hold_ttl is None else hold_ttl
        )

    @property
    def hold_ttl(self) -> float:
        """How long a v1 hold lasts."""
        return self.scripts.hold_ttl

    async def upsert(self, tag: str, limit: int) -> tuple[TagLimitView, bool]:
        """Create the tag's limit, or set its ``limit``; return it and whether it was created.

        Lifecycle events as v2 (``created`` or ``updated``, named ``tag:<tag>``). Two upserts
        racing to create the same tag: the loser's insert clashes and it runs again as an update.
        """
        try:
            return await transactions.run(self.backend, lambda tx: self.scripts.upsert(tx, tag, limit))
        except Conflict:
            return await transactions.run(self.backend, lambda tx: self.scripts.upsert(tx, tag, limit))

    async def read(self, limit_id: str) -> TagLimitView:
        """The tag limit with this id (:class:`NotFound` for an id of a limit not named ``tag:``)."""
        t = self.scripts
        return await transactions.run(self.backend, lambda tx: t.view(tx, t.lock_tag_limit(tx, limit_id)))

    async def read_tag(self, tag: str) -> TagLimitView:
        """The limit of this tag; :class:`NotFound` if none."""
        t = self.scripts
        return await transactions.run(self.backend, lambda tx: t.view(tx, t.lock_tag(tx, tag)))

    async def list_limits(self, limit: int, offset: int) -> list[TagLimitView]:
        """A page of tag limits only, ordered by tag (Prefect pages over every limit, then filters)."""
        return await transactions.run(self.backend, lambda tx: self.scripts.page(tx, limit, offset))

    async def delete(self, limit_id: str) -> None:
        """Delete the tag limit with this id: its holds end (released events), then ``deleted``."""
        t = self.scripts
        await transactions.run(
            self.backend, lambda tx: t.s.limits.delete(tx, t.lock_tag_limit(tx, limit_id)[0].id)
        )

    async def delete_tag(self, tag: str) -> None:
        """Delete the limit of this tag, as :meth:`delete`."""
        t = self.scripts
        await transactions.run(self.backend, lambda tx: t.s.limits.delete(tx, t.lock_tag(tx, tag)[0].id))

    async def reset(self, tag: str, slot_override: Sequence[str] | None = None) -> None:
        """Free every slot of the tag, then (``slot_override``) give one slot to each task run listed.

        Unlike Prefect, the slots really come back: every live hold on the tag (v1 holds and v2
        leases) loses its grant on it with a released event, and unleased slots are emptied. A v1
        hold left with no tag ends. The task runs of ``slot_override`` (each once) then get a v1
        hold on this tag each, with acquired events, even beyond the limit: the operator states
        who holds the tag, and the limit refuses newcomers until enough of them have released.
        """
        await transactions.run(self.backend, lambda tx: self.scripts.reset(tx, tag, slot_override or []))

    async def acquire(self, tags: Sequence[str], task_run_id: str) -> list[Limit]:
        """v1 increment: one slot on each active tag limit found, all or nothing, as one hold.

        Unknown tags are ignored and inactive ones skipped (Prefect). Raises
        :class:`SlotsUnavailable` without a retry hint when a found tag's limit is 0 (waiting
        would deadlock), and with one, naming the first full tag, when a tag is full or has
        waiters queued. Returns the limits held, in request order (none: no hold is recorded).
        """
        return await transactions.run(self.backend, lambda tx: self.scripts.acquire(tx, tags, task_run_id))

    async def release(self, tags: Sequence[str], task_run_id: str) -> list[Limit]:
        """v1 decrement: end every v1 hold of ``task_run_id`` that holds one of ``tags`` (its
        other tags too: a hold is one increment). Returns every tag limit found, in request
        order, whether or not it was held."""
        return await transactions.run(self.backend, lambda tx: self.scripts.end_holds(tx, tags, task_run_id))
