"""Every SQL statement slotkeeper runs, in one place, for both backends.

Statements use ``:name`` parameters and three macros that each dialect expands
(:class:`slotkeeper.storage.dialect.Dialect`):

* ``IN_LIST(param)``: membership in a list parameter (``json_each`` on SQLite, ``ANY`` on
  PostgreSQL);
* ``FOR_UPDATE``: a row lock on PostgreSQL; nothing on SQLite, whose single writer already
  serialises every transaction;
* ``NEXT_WAITER_SEQUENCE``: the next place in the waiters' arrival order.

They run through the DB-API driver directly: SQLAlchemy Core spends about 70 µs building and
executing each statement on this hardware, the driver about 4 µs, and the acquire/release hot
path runs a handful of statements per request (see ARCHITECTURE.md).

A statement whose rows are read by column comes with a row type beside it (a ``NamedTuple``:
``LimitRow._make(row).name``, never ``row[1]``); ``tests/test_queries.py`` checks that each type
names the statement's columns in order.
"""

from __future__ import annotations

from typing import NamedTuple


class LimitRow(NamedTuple):
    """A row of ``limits`` as the ``SELECT {LIMIT_COLUMNS}`` statements return it."""

    id: str
    name: str
    slot_limit: int
    active: bool
    pool_slots: int
    pool_clock: float
    denied_slots: int
    slot_decay_per_second: float
    avg_slot_occupancy_seconds: float
    fencing_token: int
    created: float
    updated: float
    pool_event_id: str | None


LIMIT_COLUMNS = ", ".join(LimitRow._fields)

# --- limits -------------------------------------------------------------------------------------

SELECT_LIMITS_BY_NAMES = f"""
SELECT {LIMIT_COLUMNS} FROM limits WHERE name IN_LIST(names) ORDER BY id FOR_UPDATE
"""

SELECT_LIMITS_BY_IDS = f"""
SELECT {LIMIT_COLUMNS} FROM limits WHERE id IN_LIST(ids) ORDER BY id FOR_UPDATE
"""


#: The columns of a limit lead the rows of the statements that read more with it
#: (``row[:LIMIT_WIDTH]`` is a :class:`LimitRow`, the rest one of the row types below).
LIMIT_WIDTH = len(LimitRow._fields)


class LimitState(NamedTuple):
    """What ``SELECT_LIMIT_STATES_BY_NAMES`` reads after a limit's columns: the slots its live
    leases hold and the slots its queued waiters wait for (NULL: none)."""

    leased_slots: int | None
    queued_slots: int | None


#: The one writer's (SQLite's) acquisition read: the named limits with their leased slots at
#: ``now`` and their queued slots, in one statement instead of three (``SELECT_LIMITS_BY_NAMES``,
#: ``SELECT_QUEUED_SLOTS_BY_NAMES``, ``SELECT_LEASED_SLOTS``). It needs ``now`` before it runs,
#: which only a backend that runs one transaction at a time may read before the locks.
SELECT_LIMIT_STATES_BY_NAMES = f"""
SELECT {LIMIT_COLUMNS},
    (SELECT SUM(g.slots) FROM grants g JOIN leases l ON l.id = g.lease_id
     WHERE g.limit_id = limits.id AND l.expires > :now) AS leased_slots,
    (SELECT SUM(w.slots) FROM waiter_limits wl JOIN waiters w ON w.id = wl.waiter_id
     WHERE wl.limit_id = limits.id AND w.lease_id IS NULL) AS queued_slots
FROM limits WHERE name IN_LIST(names) ORDER BY id FOR_UPDATE
"""


class LeaseLimit(NamedTuple):
    """What ``SELECT_LEASE_LIMITS`` reads after the columns of a limit a lease holds: the
    acquired event of the lease's grant on it, and whether any waiter is queued on it."""

    acquired_event_id: str | None
    queued: bool


#: The one writer's (SQLite's) release read: the limits a lease holds, each with its grant's
#: acquired event and whether its queue has anyone, in one statement instead of three
#: (the limits of the lease, its grants' acquired events, and the queue, read only when someone
#: is queued). It takes no row lock: only for a backend that runs one transaction at a time.
SELECT_LEASE_LIMITS = f"""
SELECT {", ".join("m." + c for c in LimitRow._fields)}, g.acquired_event_id,
    EXISTS (SELECT 1 FROM waiter_limits wl JOIN waiters w ON w.id = wl.waiter_id
            WHERE wl.limit_id = m.id AND w.lease_id IS NULL) AS queued
FROM grants g JOIN limits m ON m.id = g.limit_id WHERE g.lease_id = :id ORDER BY m.id
"""

#: The limits a lease holds, locked (what releasing or renewing it changes).
SELECT_LIMITS_OF_LEASE = f"""
SELECT {LIMIT_COLUMNS} FROM limits WHERE id IN (SELECT limit_id FROM grants WHERE lease_id = :id)
ORDER BY id FOR_UPDATE
"""

#: The limits a lease holds, locked, each with its grant's acquired event (what ending it reads
#: on PostgreSQL, one statement for two; only its limit rows are locked, ``OF m``). PostgreSQL
#: only: SQLite reads ``SELECT_LEASE_LIMITS``.
SELECT_LIMITS_OF_LEASE_WITH_GRANTS = f"""
SELECT {", ".join("m." + c for c in LimitRow._fields)}, g.acquired_event_id
FROM limits m JOIN grants g ON g.limit_id = m.id WHERE g.lease_id = :id ORDER BY m.id FOR_UPDATE OF m
"""

#: The limits a waiter waits for, locked (what granting or refusing it locks first).
SELECT_LIMITS_OF_WAITER = f"""
SELECT {LIMIT_COLUMNS} FROM limits WHERE id IN (SELECT limit_id FROM waiter_limits WHERE waiter_id = :id)
ORDER BY id FOR_UPDATE
"""

SELECT_LIMIT_BY_ID = f"SELECT {LIMIT_COLUMNS} FROM limits WHERE id = :key FOR_UPDATE"

SELECT_LIMIT_BY_NAME = f"SELECT {LIMIT_COLUMNS} FROM limits WHERE name = :key FOR_UPDATE"

SELECT_LIMITS_PAGE = f"""
SELECT {LIMIT_COLUMNS} FROM limits ORDER BY name LIMIT :limit OFFSET :offset
"""

SELECT_LIMITS_PAGE_WITH_PREFIX = f"""
SELECT {LIMIT_COLUMNS} FROM limits WHERE substr(name, 1, length(:prefix)) = :prefix
ORDER BY name LIMIT :limit OFFSET :offset
"""

#: Live leased slots per limit: the one source of each limit's leased occupancy.
SELECT_LEASED_SLOTS = """
SELECT g.limit_id, SUM(g.slots) FROM grants g JOIN leases l ON l.id = g.lease_id
WHERE g.limit_id IN_LIST(ids) AND l.expires > :now GROUP BY g.limit_id
"""

#: The same for limits named, sent right behind their locks before ``now`` is known (one round
#: trip for both): leases that expire after ``horizon`` summed, those that expire between
#: ``since`` and ``horizon`` one row per expiry (``expires`` NULL on the summed row), so that the
#: sum at any ``now`` between ``since`` and ``horizon`` is known once ``now`` is read.
SELECT_LEASED_SLOTS_NEAR_BY_NAMES = """
SELECT g.limit_id, CASE WHEN l.expires > :horizon THEN NULL ELSE l.expires END, SUM(g.slots)
FROM grants g JOIN leases l ON l.id = g.lease_id JOIN limits m ON m.id = g.limit_id
WHERE m.name IN_LIST(names) AND l.expires > :since GROUP BY 1, 2
"""

INSERT_LIMIT = """
INSERT INTO limits (id, name, slot_limit, active, created, updated, pool_slots, pool_clock,
    denied_slots, slot_decay_per_second, avg_slot_occupancy_seconds, fencing_token, pool_event_id)
VALUES (:id, :name, :slot_limit, :active, :created, :updated, :pool_slots, :pool_clock,
    :denied_slots, :slot_decay_per_second, :avg_slot_occupancy_seconds, :fencing_token,
    :pool_event_id)
"""

UPDATE_LIMIT = """
UPDATE limits SET name = :name, slot_limit = :slot_limit, active = :active, updated = :updated,
    pool_slots = :pool_slots, pool_clock = :pool_clock, denied_slots = :denied_slots,
    slot_decay_per_second = :slot_decay_per_second,
    avg_slot_occupancy_seconds = :avg_slot_occupancy_seconds, fencing_token = :fencing_token,
    pool_event_id = :pool_event_id
WHERE id = :id
"""

#: What an acquisition or a plain decrement writes back.
UPDATE_LIMIT_SLOTS = """
UPDATE limits SET pool_slots = :pool_slots, pool_clock = :pool_clock,
    fencing_token = :fencing_token, updated = :updated, pool_event_id = :pool_event_id
WHERE id = :id
"""

UPDATE_LIMIT_AVG = """
UPDATE limits SET avg_slot_occupancy_seconds = :avg WHERE id = :id
"""

DELETE_LIMIT = "DELETE FROM limits WHERE id = :id"

# --- leases and grants --------------------------------------------------------------------------

INSERT_LEASE = """
INSERT INTO leases (id, created, expires, slots, holder_type, holder_id)
VALUES (:id, :created, :expires, :slots, :holder_type, :holder_id)
"""

INSERT_GRANT = """
INSERT INTO grants (lease_id, limit_id, slots, fencing_token, acquired_event_id)
VALUES (:lease_id, :limit_id, :slots, :fencing_token, :acquired_event_id)
"""


class EndedLeaseRow(NamedTuple):
    """What deleting a lease returns (``DELETE_LEASE``, ``DELETE_LEASE_IF_EXPIRED``)."""

    created: float
    expires: float
    slots: int
    holder_type: str | None
    holder_id: str | None
    kind: str


#: Deleting the lease is the release: its grants go with it (ON DELETE CASCADE).
DELETE_LEASE = f"""
DELETE FROM leases WHERE id = :id RETURNING {", ".join(EndedLeaseRow._fields)}
"""

DELETE_LEASE_IF_EXPIRED = f"""
DELETE FROM leases WHERE id = :id AND expires <= :now
RETURNING {", ".join(EndedLeaseRow._fields)}
"""

DELETE_LIMIT_GRANTS = "DELETE FROM grants WHERE limit_id = :id"

#: Renewal is a compare-and-set on the expiry: a lease past its expiry cannot come back.
RENEW_LEASE = """
UPDATE leases SET expires = :expires WHERE id = :id AND expires > :now
"""

SELECT_EXPIRED_LEASES = """
SELECT id FROM leases WHERE expires <= :now ORDER BY expires LIMIT :batch
"""


class LimitGrantRow(NamedTuple):
    """A row of ``SELECT_LIMIT_GRANTS``: one grant on the limit, once per limit of its lease."""

    lease_id: str
    slots: int
    acquired_event_id: str | None
    holder_type: str | None
    holder_id: str | None
    #: One of the limits the lease holds (``o.limit_id``, this one included): the released
    #: event's batch.
    limit_id: str
    kind: str
    expires: float


#: Every grant on one limit (expired ones not yet reaped too), with each lease's other limits: what deleting the limit releases.
SELECT_LIMIT_GRANTS = """
SELECT g.lease_id, l.slots, g.acquired_event_id, l.holder_type, l.holder_id, o.limit_id, l.kind,
    l.expires
FROM grants g JOIN leases l ON l.id = g.lease_id JOIN grants o ON o.lease_id = g.lease_id
WHERE g.limit_id = :id
ORDER BY g.lease_id, o.limit_id
"""


class LimitLeaseRow(NamedTuple):
    """A row of ``SELECT_LIMIT_LEASES``: one live lease on the limit."""

    id: str
    holder_type: str | None
    holder_id: str | None
    slots: int
    created: float
    expires: float
    fencing_token: int


SELECT_LIMIT_LEASES = """
SELECT l.id, l.holder_type, l.holder_id, g.slots, l.created, l.expires, g.fencing_token
FROM grants g JOIN leases l ON l.id = g.lease_id
WHERE g.limit_id = :id AND l.expires > :now
ORDER BY l.created, l.id
"""

# --- events -------------------------------------------------------------------------------------

INSERT_EVENT = """
INSERT INTO events (id, occurred, received, event, resource_id, resource, related, payload,
    follows, search)
VALUES (:id, :occurred, :received, :event, :resource_id, :resource, :related, :payload,
    :follows, :search)
"""

#: Client events are de-duplicated by id: a second copy inserts nothing and returns no row.
INSERT_EVENT_IF_NEW = INSERT_EVENT.rstrip() + " ON CONFLICT (id) DO NOTHING RETURNING id\n"

INSERT_EVENT_RESOURCE = """
INSERT INTO event_resources (event_id, position, occurred, resource_id, role, labels)
VALUES (:event_id, :position, :occurred, :resource_id, :role, :labels)
"""

SELECT_EVENTS_BY_IDS = """
SELECT id, occurred, received, event, resource, related, payload, follows
FROM events WHERE id IN_LIST(ids)
"""

DELETE_EVENTS_BEFORE = """
DELETE FROM events WHERE id IN (
    SELECT id FROM events WHERE occurred < :cutoff ORDER BY occurred LIMIT :batch
)
"""

# --- event store: queries, counts (slotkeeper.storage.events) -------------------------------------
#
# Templates, completed with ``str.format`` by ``storage/events.py``: ``{where}`` is a condition
# compiled by ``slotkeeper.events.filters.compile`` over ``events e`` (its subqueries read
# ``event_resources r``); ``{direction}`` is ``ASC`` or ``DESC``. Ties on ``occurred`` are broken
# by id, so pages are stable.

SELECT_EVENTS_PAGE = """
SELECT e.id, e.occurred, e.received, e.event, e.resource, e.related, e.payload, e.follows
FROM events e WHERE {where}
ORDER BY e.occurred {direction}, e.id {direction} LIMIT :limit OFFSET :offset
"""

#: ``resource.distinct``: the first event of each resource id in the requested order.
SELECT_DISTINCT_RESOURCE_EVENTS_PAGE = """
SELECT d.id, d.occurred, d.received, d.event, d.resource, d.related, d.payload, d.follows
FROM (
    SELECT e.id, e.occurred, e.received, e.event, e.resource, e.related, e.payload, e.follows,
        ROW_NUMBER() OVER (
            PARTITION BY e.resource_id ORDER BY e.occurred {direction}, e.id {direction}
        ) AS nth
    FROM events e WHERE {where}
) d
WHERE d.nth = 1
ORDER BY d.occurred {direction}, d.id {direction} LIMIT :limit OFFSET :offset
"""

COUNT_EVENTS = "SELECT COUNT(*) FROM events e WHERE {where}"

COUNT_DISTINCT_EVENT_RESOURCES = "SELECT COUNT(DISTINCT e.resource_id) FROM events e WHERE {where}"

#: Count-by ``event``: value and label are the name.
COUNT_EVENTS_BY_NAME = """
SELECT e.event, e.event, COUNT(*), MIN(e.occurred), MAX(e.occurred)
FROM events e WHERE {where} GROUP BY e.event
"""

#: Count-by ``resource``, per (id, label): the label of the latest group wins (in Python).
COUNT_EVENTS_BY_RESOURCE = {
    "sqlite": """
SELECT e.resource_id, COALESCE(
        (SELECT j.value FROM json_each(e.resource) AS j WHERE j.key = 'prefect.resource.name'),
        (SELECT j.value FROM json_each(e.resource) AS j WHERE j.key = 'prefect.name'),
        e.resource_id),
    COUNT(*), MIN(e.occurred), MAX(e.occurred)
FROM events e WHERE {where} GROUP BY 1, 2
""",
    "postgresql": """
SELECT e.resource_id, COALESCE(
        e.resource::jsonb ->> 'prefect.resource.name',
        e.resource::jsonb ->> 'prefect.name',
        e.resource_id),
    COUNT(*), MIN(e.occurred), MAX(e.occurred)
FROM events e WHERE {where} GROUP BY 1, 2
""",
}

#: Count-by ``time``/``day``: the index of each event's bucket, counted from the pivot.
COUNT_EVENTS_BY_BUCKET = """
SELECT CAST(floor((e.occurred - :pivot) / :width) AS BIGINT), COUNT(*), MIN(e.occurred), MAX(e.occurred)
FROM events e WHERE {where} GROUP BY 1
"""

# --- the wait queue (slotkeeper.storage.core: acquire with wait, admission) ---------------------

#: Slots that queued (not yet granted) waiters wait for, per limit: newcomers may not barge.
SELECT_QUEUED_SLOTS = """
SELECT wl.limit_id, SUM(w.slots) FROM waiter_limits wl JOIN waiters w ON w.id = wl.waiter_id
WHERE wl.limit_id IN_LIST(ids) AND w.lease_id IS NULL GROUP BY wl.limit_id
"""

#: The same for limits named: sent right behind their locks (no round trip to learn the ids).
SELECT_QUEUED_SLOTS_BY_NAMES = """
SELECT wl.limit_id, SUM(w.slots) FROM waiter_limits wl JOIN waiters w ON w.id = wl.waiter_id
JOIN limits m ON m.id = wl.limit_id
WHERE m.name IN_LIST(names) AND w.lease_id IS NULL GROUP BY wl.limit_id
"""

#: The waiter's place in the arrival order (``sequence``) is drawn here, while the transaction
#: holds the locks of its limits.
INSERT_WAITER = """
INSERT INTO waiters (id, sequence, enqueued, priority, slots, lease_duration, holder_type,
    holder_id, deadline, owner, heartbeat, lease_id)
VALUES (:id, NEXT_WAITER_SEQUENCE, :enqueued, :priority, :slots, :lease_duration, :holder_type,
    :holder_id, :deadline, :owner, :heartbeat, NULL)
"""

INSERT_WAITER_LIMIT = """
INSERT INTO waiter_limits (waiter_id, limit_id, position) VALUES (:waiter_id, :limit_id, :position)
"""


class QueuedWaiterRow(NamedTuple):
    """A row of the queue statements (``SELECT_WAITERS_ON``...): one waiter and one limit it names."""

    id: str
    slots: int
    priority: int
    sequence: int
    lease_duration: float
    holder_type: str | None
    holder_id: str | None
    limit_id: str
    enqueued: float


def _queue_of(waiter_ids: str) -> str:
    """The queue, in order (``domain.admit``'s: ``(-priority, sequence)``), of the waiters that
    ``waiter_ids`` (a subquery) selects: one row per waiter and limit it names (the last column),
    in its request's order, so that one read gives both the queue and every limit it needs."""
    return f"""
SELECT w.id, w.slots, w.priority, w.sequence, w.lease_duration, w.holder_type, w.holder_id, wl.limit_id,
    w.enqueued
FROM waiters w JOIN waiter_limits wl ON wl.waiter_id = w.id
WHERE w.lease_id IS NULL AND w.id IN ({waiter_ids})
ORDER BY w.priority DESC, w.sequence, wl.position
"""


#: The queue of every waiter naming one of these limits.
SELECT_WAITERS_ON = _queue_of("SELECT waiter_id FROM waiter_limits WHERE limit_id IN_LIST(ids)")

#: The same for the limits a lease holds (what releasing it frees).
SELECT_WAITERS_ON_LEASE = _queue_of(
    "SELECT waiter_id FROM waiter_limits WHERE limit_id IN "
    "(SELECT g.limit_id FROM grants g JOIN limits m ON m.id = g.limit_id WHERE g.lease_id = :id)"
)

#: Which of these waiters are still queued (neither granted nor refused, nor gone).
SELECT_STILL_QUEUED = """
SELECT id FROM waiters WHERE id IN_LIST(ids) AND lease_id IS NULL AND refused IS NULL
"""

SELECT_WAITER_LIMITS = """
SELECT waiter_id, limit_id FROM waiter_limits WHERE waiter_id IN_LIST(ids) ORDER BY waiter_id, position
"""

MARK_WAITER_GRANTED = "UPDATE waiters SET lease_id = :lease_id WHERE id = :id"

#: The queued waiters of one limit (what deleting it refuses), in queue order.
SELECT_QUEUED_WAITERS_OF = """
SELECT w.id FROM waiters w JOIN waiter_limits wl ON wl.waiter_id = w.id
WHERE wl.limit_id = :id AND w.lease_id IS NULL
ORDER BY w.priority DESC, w.sequence
"""

#: A refused waiter of another process keeps its row (with why) until its request reads it...
MARK_WAITER_REFUSED = "UPDATE waiters SET refused = :refused WHERE id = :id"

#: ... but leaves every queue at once: a queue is the waiters that name the limit.
DELETE_WAITER_LIMITS = "DELETE FROM waiter_limits WHERE waiter_id = :id"

DELETE_WAITER = "DELETE FROM waiters WHERE id = :id RETURNING lease_id"


class WaiterOutcomeRow(NamedTuple):
    """How a wait ended, if it did (``SELECT_WAITER_LEASE``)."""

    lease_id: str | None
    refused: str | None


#: How a wait ended, if it did: its lease (granted), or why it was refused.
SELECT_WAITER_LEASE = "SELECT lease_id, refused FROM waiters WHERE id = :id"

TOUCH_WAITERS = "UPDATE waiters SET heartbeat = :now WHERE owner = :owner"

#: Waiters whose request is gone: its process stopped sending heartbeats, or it outlived its wait;
#: or detached at a shutdown (no heartbeat) and not taken back before its deadline.
SELECT_ABANDONED_WAITERS = """
SELECT id FROM waiters
WHERE (heartbeat < :stale AND owner <> :detached) OR deadline < :late OR (owner = :detached AND deadline < :now)
"""

#: At shutdown: these waiters belong to nobody until ``until`` (their request was answered 503);
#: the rows that are still there.
DETACH_WAITERS = """
UPDATE waiters SET owner = :detached, heartbeat = :now, deadline = :until
WHERE id IN_LIST(ids) RETURNING id
"""


class WaiterStateRow(NamedTuple):
    """Whose a waiter is, how its wait ended (if it did), its lease's duration (``SELECT_WAITER_STATE``)."""

    owner: str
    lease_id: str | None
    refused: str | None
    lease_duration: float


#: Whose a waiter is, and how its wait ended (if it did); and its lease's duration.
SELECT_WAITER_STATE = "SELECT owner, lease_id, refused, lease_duration FROM waiters WHERE id = :id"

#: A detached waiter is taken back by the request that names it.
ATTACH_WAITER = "UPDATE waiters SET owner = :owner, heartbeat = :now, deadline = :deadline WHERE id = :id"

SELECT_QUEUED_LIMITS = """
SELECT DISTINCT wl.limit_id FROM waiter_limits wl JOIN waiters w ON w.id = wl.waiter_id
WHERE w.lease_id IS NULL
"""

#: The fencing token of each grant of a lease.
SELECT_LEASE_TOKENS = "SELECT limit_id, fencing_token FROM grants WHERE lease_id = :lease_id"

SELECT_LEASE_CREATED = "SELECT created FROM leases WHERE id = :id"

#: The other limits that the waiters of one limit wait for.
SELECT_CO_WAITED_LIMITS = """
SELECT DISTINCT o.limit_id FROM waiter_limits wl JOIN waiter_limits o ON o.waiter_id = wl.waiter_id
WHERE wl.limit_id = :id AND o.limit_id != :id
"""

# --- tag-based (v1) holds (slotkeeper.storage.tags) ----------------------------------------------

#: A v1 hold: a lease of kind 'v1' held by one task run (one per increment, one slot per tag).
INSERT_V1_LEASE = """
INSERT INTO leases (id, created, expires, slots, holder_type, holder_id, kind)
VALUES (:id, :created, :expires, 1, 'task_run', :holder_id, 'v1')
"""

#: The v1 holds of one task run that hold one of the named limits (expired or not: a decrement
#: ends an expired hold that the reaper has not reached yet, exactly once either way).
SELECT_V1_HOLDS_OF = """
SELECT DISTINCT l.id, l.created FROM leases l
JOIN grants g ON g.lease_id = l.id JOIN limits m ON m.id = g.limit_id
WHERE l.kind = 'v1' AND l.holder_type = 'task_run' AND l.holder_id = :holder_id
    AND m.name IN_LIST(names)
ORDER BY l.created, l.id
"""

#: Lock, in id order, the named limits and every limit the given leases hold: what a v1
#: decrement changes, locked up front so the lock order stays limits-by-id.
LOCK_LIMITS_OF_HOLDS = """
SELECT id FROM limits
WHERE name IN_LIST(names) OR id IN (SELECT limit_id FROM grants WHERE lease_id IN_LIST(leases))
ORDER BY id FOR_UPDATE
"""

#: The task runs holding each limit through a live lease (v1 holds and v2 leases alike), in the
#: order they acquired it (fencing tokens increase with every acquisition of a limit): the
#: ``active_slots`` of the v1 view.
SELECT_TASK_RUN_HOLDERS = """
SELECT g.limit_id, l.holder_id FROM grants g JOIN leases l ON l.id = g.lease_id
WHERE g.limit_id IN_LIST(ids) AND l.expires > :now AND l.holder_type = 'task_run'
ORDER BY g.limit_id, g.fencing_token
"""

#: A v1 hold left without any grant (its tags were reset or deleted) can never be released by
#: its task run: it goes. A v2 lease stays, for its holder to renew or release by id.
DELETE_EMPTY_V1_LEASES = """
DELETE FROM leases WHERE kind = 'v1' AND id IN_LIST(ids)
    AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.lease_id = leases.id)
"""

# --- statistics (read at a metrics scrape; see storage/stats.py) ---------------------------------

#: Every limit with what its live leases hold and how many queued waiters name it.
SELECT_LIMIT_STATS = """
SELECT m.id, m.name, m.slot_limit, m.active, m.pool_slots, m.pool_clock, m.slot_decay_per_second,
    COALESCE(g.leased, 0), COALESCE(q.waiters, 0)
FROM limits m
LEFT JOIN (
    SELECT gr.limit_id AS limit_id, SUM(gr.slots) AS leased FROM grants gr
    JOIN leases le ON le.id = gr.lease_id WHERE le.expires > :now GROUP BY gr.limit_id
) g ON g.limit_id = m.id
LEFT JOIN (
    SELECT wl.limit_id AS limit_id, COUNT(*) AS waiters FROM waiter_limits wl
    JOIN waiters w ON w.id = wl.waiter_id WHERE w.lease_id IS NULL GROUP BY wl.limit_id
) q ON q.limit_id = m.id
"""

# --- operator views (slotkeeper.storage.views): read-only, no row locks ---------------------------

#: A limit by id or by name, not locked: what a view reads (it changes nothing).
PEEK_LIMIT_BY_ID = f"SELECT {LIMIT_COLUMNS} FROM limits WHERE id = :key"
PEEK_LIMIT_BY_NAME = f"SELECT {LIMIT_COLUMNS} FROM limits WHERE name = :key"

COUNT_LIMITS_WITH_PREFIX = "SELECT COUNT(*) FROM limits WHERE substr(name, 1, length(:prefix)) = :prefix"

#: How many requests wait in each of these limits' queues, and for how many slots in all.
SELECT_QUEUE_SIZES = """
SELECT wl.limit_id, COUNT(*), SUM(w.slots) FROM waiter_limits wl JOIN waiters w ON w.id = wl.waiter_id
WHERE wl.limit_id IN_LIST(ids) AND w.lease_id IS NULL AND w.refused IS NULL GROUP BY wl.limit_id
"""

#: One limit's queue in ``domain.queue_order`` (the first row is served next), and how many limits
#: each waiter waits for (all of them at once).
SELECT_QUEUE_OF = """
SELECT w.id, w.priority, w.slots, w.enqueued, w.deadline, w.holder_type, w.holder_id,
    (SELECT COUNT(*) FROM waiter_limits o WHERE o.waiter_id = w.id)
FROM waiters w JOIN waiter_limits wl ON wl.waiter_id = w.id
WHERE wl.limit_id = :id AND w.lease_id IS NULL AND w.refused IS NULL
ORDER BY w.priority DESC, w.sequence
LIMIT :limit
"""

#: How long the grant of an acquired event waited in the queue (``payload.waited_seconds``; a
#: grant made at once has none: 0).
_WAITED = {
    "sqlite": "COALESCE(json_extract(e.payload, '$.waited_seconds'), 0.0)",
    "postgresql": "COALESCE((e.payload::jsonb ->> 'waited_seconds')::double precision, 0.0)",
}


def _grant_stats(waited: str) -> str:
    """Per time bucket of a limit's acquired events: the grants (``c``), and the waits of ranks
    ``n`` that are a nearest-rank percentile (50, 90, 99) or the maximum: exact, sorted by the
    database, a few rows per bucket whatever the traffic."""
    ranks = " OR ".join(f"(n * 100 >= {p} * c AND (n - 1) * 100 < {p} * c)" for p in (50, 90, 99))
    return f"""
WITH g AS (
    SELECT CAST(floor((e.occurred - :since) / :width) AS BIGINT) AS b, {waited} AS s
    FROM events e
    WHERE e.resource_id IN_LIST(resources) AND e.event IN_LIST(names)
        AND e.occurred >= :since AND e.occurred < :until
), r AS (
    SELECT b, s, ROW_NUMBER() OVER (PARTITION BY b ORDER BY s) AS n, COUNT(*) OVER (PARTITION BY b) AS c
    FROM g
)
SELECT b, c, n, s FROM r WHERE n = c OR {ranks}
ORDER BY b, n
"""


#: See :func:`_grant_stats`; one statement per backend (only the JSON access differs).
SELECT_GRANT_STATS = {backend: _grant_stats(waited) for backend, waited in _WAITED.items()}


# --- outbox: gateway mode (slotkeeper.storage.outbox) ----------------------------------------------

#: Takes the rows of ``INSERT_EVENT`` (a server event's columns; the others are ignored).
INSERT_OUTBOX = """
INSERT INTO outbox (event_id, occurred, event, resource, related, payload, follows)
VALUES (:id, :occurred, :event, :resource, :related, :payload, :follows)
"""


class OutboxRow(NamedTuple):
    """A row of ``SELECT_OUTBOX``: an event waiting for the upstream, with its place (``seq``)."""

    seq: int
    event_id: str
    occurred: float
    event: str
    resource: str
    related: str
    payload: str
    follows: str | None


SELECT_OUTBOX = """
SELECT seq, event_id, occurred, event, resource, related, payload, follows
FROM outbox ORDER BY seq LIMIT :batch
"""

DELETE_OUTBOX = "DELETE FROM outbox WHERE seq IN_LIST(seqs)"

#: How many events wait, and when the oldest occurred (NULL: none).
SELECT_OUTBOX_BACKLOG = "SELECT COUNT(*), MIN(occurred) FROM outbox"

#: Take or renew the delivery lease: a row comes back only if ``:owner`` holds it now (it was
#: free, expired, or already its own). Concurrent takers are serialised by the row's lock.
CLAIM_OUTBOX_LEASE = """
INSERT INTO outbox_lease (name, owner, expires) VALUES ('delivery', :owner, :expires)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE outbox_lease.owner = excluded.owner OR outbox_lease.expires <= :now
RETURNING owner
"""

#: Give the lease up (a process that stops): another process may take it at once.
FREE_OUTBOX_LEASE = "UPDATE outbox_lease SET expires = 0 WHERE name = 'delivery' AND owner = :owner"

INSERT_OUTBOX_COPY = "INSERT INTO outbox_copies (owner, copy) VALUES (:owner, :copy)"

#: The copies other processes shared, taken (deleted) by the delivering process, oldest first.
TAKE_OUTBOX_COPIES = """
DELETE FROM outbox_copies WHERE seq IN (
    SELECT seq FROM outbox_copies WHERE owner <> :owner ORDER BY seq LIMIT :batch
)
RETURNING seq, copy
"""
