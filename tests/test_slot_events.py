"""The events the server writes for every slot change (issue 3), on both backends.

* the exact JSON of ``acquired``/``released`` for one limit and for a batch of three, as served by
  ``POST /api/events/filter``, checked label by label against
  ``shared/reference/concurrency-events.md`` (and the reference §7.2);
* lifecycle events (created, updated, deleted) with their payload;
* a released event for every way slots are given back: lease release, plain decrement, expiry
  reclaimed by the reaper, deletion of a limit that still had holders; the queue's admission;
* a refused acquisition (423, 422) writes nothing;
* a hypothesis property test: random acquire / release / expiry / delete / refused sequences,
  where every grant has exactly one acquired event per limit and every ended grant exactly one
  released event that follows it.

Everything runs on the fake clock; nothing is timed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from slotkeeper.domain import Mode
from slotkeeper.errors import InvalidRequest, SlotsUnavailable
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import AcquireRequest, Holder, LeaseSpec, LimitSpec, LimitView
from slotkeeper.storage import Storage
from tests.conftest import FakeClock, take

HOUR = 3600.0
TASK = Holder("task_run", "7b1e3c55-8a2d-4f0e-b6a1-3c9d2e4f5a60")
FLOW = Holder("flow_run", "0d9a5c1e-2f4b-4c1a-9e59-9e8a4b7c6d01")
DEPLOYMENT = Holder("deployment", "3f0c9d2e-6a7b-4c8d-9e0f-1a2b3c4d5e6f")
LIMIT_ROLE = "concurrency-limit"
SELECT_EVENTS = "SELECT id, occurred, received, event, resource, related, payload, follows FROM events"


# --- helpers --------------------------------------------------------------------------------------


def iso(ts: float) -> str:
    """How Prefect (and slotkeeper) write a time on the wire, computed independently."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rid(limit_id: str) -> str:
    return f"prefect.concurrency-limit.{limit_id}"


def other_limit(limit_id: str) -> dict[str, str]:
    return {"prefect.resource.id": rid(limit_id), "prefect.resource.role": LIMIT_ROLE}


def assert_uuid7(value: str) -> None:
    parsed = uuid.UUID(value)
    assert parsed.version == 7, value
    assert str(parsed) == value  # canonical spelling


async def stored_events(storage: Storage, limit_ids: Sequence[str] | None = None) -> list[EventRecord]:
    """The stored events (of these limits' resources), read straight from the events table."""
    if limit_ids is None:
        rows = await storage.backend.run(lambda tx: tx.all(SELECT_EVENTS))
    else:
        ids = [rid(i) for i in limit_ids]
        rows = await storage.backend.run(
            lambda tx: tx.all(SELECT_EVENTS + " WHERE resource_id IN_LIST(ids)", {"ids": ids})
        )
    return [EventRecord.from_row(r) for r in rows]


def by_name(events: Sequence[EventRecord], name: str) -> list[EventRecord]:
    return [e for e in events if e.event == name]


def one(events: Sequence[EventRecord], name: str, limit_id: str) -> EventRecord:
    """The only event called ``name`` on this limit."""
    found = [e for e in events if e.event == name and e.resource_id == rid(limit_id)]
    assert len(found) == 1, (name, limit_id, found)
    return found[0]


async def make(storage: Storage, name: str = "db", limit: int = 5, **fields: Any) -> LimitView:
    return await storage.create_limit(LimitSpec(name=name, limit=limit, **fields))


async def api_events(client: httpx.AsyncClient, **criteria: Any) -> list[dict[str, Any]]:
    """Every event as ``POST /api/events/filter`` serves it (ASC), through all pages."""
    body = {
        "filter": {
            "occurred": {"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"},
            "order": "ASC",
            **criteria,
        },
        "limit": 50,
    }
    response = await client.post("/events/filter", json=body)
    assert response.status_code == 200, response.text
    page = response.json()
    events: list[dict[str, Any]] = page["events"]
    while page["next_page"]:
        token = page["next_page"].split("page-token=")[1]
        response = await client.get("/events/filter/next", params={"page-token": token})
        assert response.status_code == 200, response.text
        page = response.json()
        events.extend(page["events"])
    return events


def wire_one(events: Sequence[dict[str, Any]], name: str, limit_id: str) -> dict[str, Any]:
    found = [
        e for e in events if e["event"] == name and e["resource"]["prefect.resource.id"] == rid(limit_id)
    ]
    assert len(found) == 1, (name, limit_id, found)
    return found[0]


async def create_api(client: httpx.AsyncClient, name: str, limit: int, **fields: Any) -> str:
    response = await client.post("/v2/concurrency_limits/", json={"name": name, "limit": limit, **fields})
    assert response.status_code == 201, response.text
    limit_id: str = response.json()["id"]
    return limit_id


# --- exact JSON: one limit, three limits ----------------------------------------------------------


async def test_one_limit_acquired_and_released_exact_json(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    db = await create_api(client, "db", 5)
    acquired_at = clock.now
    response = await client.post(
        "/v2/concurrency_limits/increment-with-lease",
        json={
            "names": ["db"],
            "slots": 2,
            "lease_duration": 86400,
            "holder": {"type": "task_run", "id": TASK.id},
        },
    )
    assert response.status_code == 200, response.text
    lease_id = response.json()["lease_id"]
    clock.advance(5 * HOUR)  # far beyond Prefect's 5-minute `follows` window: the link stays
    released_at = clock.now
    response = await client.post("/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease_id})
    assert response.status_code == 204, response.text

    events = await api_events(client, event={"prefix": ["prefect.concurrency-limit."]})
    assert [e["event"] for e in events] == [builders.CREATED, builders.ACQUIRED, builders.RELEASED]
    created, acquired, released = events
    resource = {
        "prefect.resource.id": f"prefect.concurrency-limit.{db}",
        "prefect.resource.name": "db",
        "slots-acquired": "2",
        "limit": "5",
    }
    # The holder is a deliberate addition: Prefect's client adds its run context the same way.
    holder = {"prefect.resource.id": f"prefect.task-run.{TASK.id}", "prefect.resource.role": "task-run"}
    assert acquired == {
        "occurred": iso(acquired_at),
        "event": "prefect.concurrency-limit.acquired",
        "resource": resource,
        "related": [holder],
        "payload": {},
        "id": acquired["id"],
        "follows": None,
        "received": iso(acquired_at),
    }
    assert released == {
        "occurred": iso(released_at),
        "event": "prefect.concurrency-limit.released",
        "resource": resource,
        "related": [holder],
        "payload": {},
        "id": released["id"],
        "follows": acquired["id"],
        "received": iso(released_at),
    }
    for event in events:
        assert_uuid7(event["id"])
        assert all(isinstance(v, str) for v in event["resource"].values())
    assert len({e["id"] for e in events}) == 3
    assert created["resource"] == {
        "prefect.resource.id": f"prefect.concurrency-limit.{db}",
        "prefect.resource.name": "db",
    }


async def test_three_limit_acquisition_exact_json(client: httpx.AsyncClient, clock: FakeClock) -> None:
    ids = {name: await create_api(client, name, limit) for name, limit in [("a", 3), ("b", 4), ("c", 9)]}
    order = ["c", "a", "b"]
    acquired_at = clock.now
    response = await client.post(
        "/v2/concurrency_limits/increment-with-lease",
        json={"names": order, "slots": 3, "lease_duration": 86400},
    )
    assert response.status_code == 200, response.text
    assert [lim["name"] for lim in response.json()["limits"]] == order
    lease_id = response.json()["lease_id"]
    clock.advance(23 * HOUR)
    released_at = clock.now
    response = await client.post("/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease_id})
    assert response.status_code == 204

    events = await api_events(client, event={"name": [builders.ACQUIRED, builders.RELEASED]})
    assert len(events) == 6
    limits = {"a": "3", "b": "4", "c": "9"}
    for name in order:
        resource = {
            "prefect.resource.id": rid(ids[name]),
            "prefect.resource.name": name,
            "slots-acquired": "3",
            "limit": limits[name],
        }
        # One related resource per *other* limit of the batch, none for the limit itself; no holder.
        others = [other_limit(ids[n]) for n in order if n != name]
        acquired = wire_one(events, builders.ACQUIRED, ids[name])
        released = wire_one(events, builders.RELEASED, ids[name])
        assert acquired == {
            "occurred": iso(acquired_at),
            "event": builders.ACQUIRED,
            "resource": resource,
            "related": others,
            "payload": {},
            "id": acquired["id"],
            "follows": None,
            "received": iso(acquired_at),
        }
        # Released lists the same related resources; their order is the limits' id order (the
        # grant rows do not keep the request order), so they are compared as a set here.
        assert sorted(released["related"], key=str) == sorted(others, key=str)
        assert released == {
            "occurred": iso(released_at),
            "event": builders.RELEASED,
            "resource": resource,
            "related": released["related"],
            "payload": {},
            "id": released["id"],
            "follows": acquired["id"],  # the same limit's acquired event of the same grant
            "received": iso(released_at),
        }
        assert_uuid7(acquired["id"])
        assert_uuid7(released["id"])


@pytest.mark.parametrize(
    ("holder", "resource_id", "role"),
    [
        (TASK, f"prefect.task-run.{TASK.id}", "task-run"),
        (FLOW, f"prefect.flow-run.{FLOW.id}", "flow-run"),
        (DEPLOYMENT, f"prefect.deployment.{DEPLOYMENT.id}", "deployment"),
    ],
)
async def test_the_holder_is_related_with_its_kind_as_role(
    storage: Storage, holder: Holder, resource_id: str, role: str
) -> None:
    a = (await make(storage, "a")).limit.id
    b = (await make(storage, "b")).limit.id
    granted = await take(storage, "a", "b", holder=holder)
    await storage.release_lease(granted.lease_id or "")
    events = await stored_events(storage, [a, b])
    related_holder = {"prefect.resource.id": resource_id, "prefect.resource.role": role}
    for name in (builders.ACQUIRED, builders.RELEASED):
        assert one(events, name, a).related == [other_limit(b), related_holder]
        assert one(events, name, b).related == [other_limit(a), related_holder]


async def test_acquired_without_a_lease_has_no_holder_and_plain_limits(storage: Storage) -> None:
    db = (await make(storage, "db", 5)).limit.id
    await take(storage, "db", slots=5, lease=None)
    (acquired,) = by_name(await stored_events(storage, [db]), builders.ACQUIRED)
    assert acquired.resource == {
        "prefect.resource.id": rid(db),
        "prefect.resource.name": "db",
        "slots-acquired": "5",
        "limit": "5",
    }
    assert (acquired.related, acquired.payload, acquired.follows) == ([], {}, None)


# --- lifecycle events -----------------------------------------------------------------------------


async def test_lifecycle_events_exact_json(client: httpx.AsyncClient, clock: FakeClock) -> None:
    created_at = clock.now
    db = await create_api(client, "db", 3, slot_decay_per_second=0.5)
    clock.advance(10)
    updated_at = clock.now
    response = await client.patch("/v2/concurrency_limits/db", json={"limit": 7, "active": False})
    assert response.status_code == 204
    clock.advance(10)
    deleted_at = clock.now
    response = await client.delete("/v2/concurrency_limits/db")
    assert response.status_code == 204

    events = await api_events(client)
    resource = {"prefect.resource.id": f"prefect.concurrency-limit.{db}", "prefect.resource.name": "db"}

    def lifecycle(name: str, at: float, payload: dict[str, Any], event_id: str) -> dict[str, Any]:
        return {
            "occurred": iso(at),
            "event": name,
            "resource": resource,
            "related": [],
            "payload": payload,
            "id": event_id,
            "follows": None,
            "received": iso(at),
        }

    created, updated, deleted = events
    payload = {"name": "db", "limit": 3, "active": True, "slot_decay_per_second": 0.5}
    assert created == lifecycle(builders.CREATED, created_at, payload, created["id"])
    payload = {"name": "db", "limit": 7, "active": False, "slot_decay_per_second": 0.5}
    assert updated == lifecycle(builders.UPDATED, updated_at, payload, updated["id"])
    assert deleted == lifecycle(builders.DELETED, deleted_at, payload, deleted["id"])
    for event in events:
        assert_uuid7(event["id"])
        assert type(event["payload"]["limit"]) is int
        assert type(event["payload"]["slot_decay_per_second"]) is float


async def test_a_renamed_limit_names_its_new_name(storage: Storage) -> None:
    db = (await make(storage, "db")).limit.id
    await storage.update_limit("db", {"name": "warehouse"})
    granted = await take(storage, "warehouse")
    await storage.release_lease(granted.lease_id or "")
    events = await stored_events(storage, [db])
    assert one(events, builders.UPDATED, db).payload["name"] == "warehouse"
    for name in (builders.ACQUIRED, builders.RELEASED):
        assert one(events, name, db).resource["prefect.resource.name"] == "warehouse"


# --- every kind of release ------------------------------------------------------------------------


async def test_release_follows_its_acquired_whatever_the_time(storage: Storage, clock: FakeClock) -> None:
    db = (await make(storage, "db", 5)).limit.id
    first = await take(storage, slots=2, lease=86400, holder=TASK)
    second = await take(storage, slots=1, lease=86400, holder=FLOW)
    clock.advance(7 * HOUR)
    assert await storage.release_lease(second.lease_id or "")
    clock.advance(9 * HOUR)
    assert await storage.release_lease(first.lease_id or "")
    assert not await storage.release_lease(first.lease_id or "")  # twice: nothing more
    events = await stored_events(storage, [db])
    acquired = by_name(events, builders.ACQUIRED)
    released = by_name(events, builders.RELEASED)
    assert len(acquired) == len(released) == 2
    by_slots = {e.resource["slots-acquired"]: e for e in acquired}
    for event in released:
        source = by_slots[event.resource["slots-acquired"]]
        assert event.follows == source.id
        assert event.related == source.related  # the same holder
        assert event.occurred - source.occurred in (7 * HOUR, 16 * HOUR)


async def test_a_plain_decrement_follows_the_latest_unleased_acquisition(
    storage: Storage, clock: FakeClock
) -> None:
    a = (await make(storage, "a", 5)).limit.id
    b = (await make(storage, "b", 5)).limit.id
    await take(storage, "a", slots=2, lease=None)
    clock.advance(HOUR)
    await take(storage, "a", "b", slots=1, lease=None)
    latest = {i: by_name(await stored_events(storage, [i]), builders.ACQUIRED)[-1] for i in (a, b)}
    assert latest[a].occurred == clock.now
    clock.advance(2 * HOUR)
    await storage.release_slots(["a", "b"], 2, None)
    events = await stored_events(storage, [a, b])
    for limit_id, freed, others in [(a, "2", [other_limit(b)]), (b, "1", [other_limit(a)])]:
        released = one(events, builders.RELEASED, limit_id)
        assert released.follows == latest[limit_id].id
        assert released.occurred == clock.now
        assert released.resource["slots-acquired"] == freed  # what the decrement freed
        assert released.related == others  # the decrement's other limits
        assert released.payload == {}
    # Nothing left to free on b: a decrement that frees nothing writes nothing.
    await storage.release_slots(["b"], 1, None)
    assert len(by_name(await stored_events(storage, [b]), builders.RELEASED)) == 1


async def test_expiry_reclaimed_by_the_reaper_is_released_at_the_expiry(
    storage: Storage, clock: FakeClock
) -> None:
    a = (await make(storage, "a")).limit.id
    b = (await make(storage, "b")).limit.id
    start = clock.now
    granted = await take(storage, "a", "b", slots=2, lease=30, holder=FLOW)
    clock.advance(3 * HOUR)  # the reaper comes long after
    assert await storage.reap_expired() == 1
    assert await storage.reap_expired() == 0
    assert not await storage.release_lease(granted.lease_id or "")
    events = await stored_events(storage, [a, b])
    for limit_id in (a, b):
        acquired = one(events, builders.ACQUIRED, limit_id)
        released = one(events, builders.RELEASED, limit_id)
        assert released.occurred == start + 30  # the lease's expiry, not the reaper's now
        assert released.received == clock.now  # when the server recorded it
        assert released.follows == acquired.id
        assert released.resource == acquired.resource
    # A lease released by its holder after its expiry (before the reaper) also ends at expiry.
    late = await take(storage, "a", lease=10)
    expiry = clock.now + 10
    clock.advance(HOUR)
    assert await storage.release_lease(late.lease_id or "")
    released = [
        e for e in by_name(await stored_events(storage, [a]), builders.RELEASED) if e.occurred == expiry
    ]
    assert len(released) == 1


async def test_deleting_a_held_limit_releases_every_holder(storage: Storage, clock: FakeClock) -> None:
    db = (await make(storage, "db", 9)).limit.id
    other = (await make(storage, "other", 9)).limit.id
    shared = await take(storage, "db", "other", slots=2, holder=TASK, lease=HOUR)
    alone = await take(storage, "db", slots=1, lease=HOUR)
    await take(storage, "db", slots=3, lease=None)
    clock.advance(60)
    deleted_at = clock.now
    await storage.delete_limit("db")
    events = await stored_events(storage, [db, other])
    acquired = {
        e.resource["slots-acquired"]: e
        for e in by_name(events, builders.ACQUIRED)
        if e.resource_id == rid(db)
    }
    released = [e for e in by_name(events, builders.RELEASED) if e.resource_id == rid(db)]
    assert len(released) == len(acquired) == 3  # two leases and the unleased slots
    assert {e.follows for e in released} == {e.id for e in acquired.values()}
    for event in released:
        source = acquired[event.resource["slots-acquired"]]
        assert event.occurred == deleted_at
        assert event.follows == source.id
        assert event.related == source.related
    deleted = one(events, builders.DELETED, db)
    assert deleted.occurred == deleted_at
    # The holder of both limits keeps the other one; releasing it now writes that one only.
    assert await storage.release_lease(shared.lease_id or "")
    # The lease that held only the deleted limit still exists but holds nothing: no event.
    assert await storage.release_lease(alone.lease_id or "")
    events = await stored_events(storage, [db, other])
    assert len([e for e in by_name(events, builders.RELEASED) if e.resource_id == rid(db)]) == 3
    other_released = one(events, builders.RELEASED, other)
    assert other_released.follows == one(events, builders.ACQUIRED, other).id
    holder = {"prefect.resource.id": f"prefect.task-run.{TASK.id}", "prefect.resource.role": "task-run"}
    assert other_released.related == [holder]  # the deleted limit is no longer in its batch


async def test_deleting_a_limit_with_a_decaying_pool_releases_the_leases_only(storage: Storage) -> None:
    db = (await make(storage, "db", 9, slot_decay_per_second=0.5)).limit.id
    await take(storage, "db", slots=3, lease=None)  # comes back by decay: never "released"
    await take(storage, "db", slots=2, lease=HOUR)
    await storage.delete_limit("db")
    events = await stored_events(storage, [db])
    (released,) = by_name(events, builders.RELEASED)
    assert released.resource["slots-acquired"] == "2"


async def test_rate_limit_acquisitions_write_acquired_only(storage: Storage, clock: FakeClock) -> None:
    db = (await make(storage, "db", 4, slot_decay_per_second=2.0)).limit.id
    unleased = await take(storage, "db", slots=2, lease=None, mode=Mode.RATE_LIMIT)
    leased = await take(storage, "db", slots=2, lease=60, mode=Mode.RATE_LIMIT, holder=TASK)
    assert unleased.lease_id is None and leased.lease_id is not None
    clock.advance(120)
    assert await storage.release_lease(leased.lease_id)
    await storage.reap_expired()
    events = await stored_events(storage, [db])
    assert [e.event for e in events].count(builders.ACQUIRED) == 2
    assert by_name(events, builders.RELEASED) == []


async def queued(storage: Storage) -> int:
    row = await storage.backend.run(lambda tx: tx.one("SELECT COUNT(*) FROM waiters"))
    return int(row[0]) if row else 0


async def test_an_admitted_waiter_writes_its_acquired_events(storage: Storage, clock: FakeClock) -> None:
    a = (await make(storage, "a", 1)).limit.id
    b = (await make(storage, "b", 1)).limit.id
    first = await take(storage, "a", "b", holder=FLOW, lease=HOUR)
    request = AcquireRequest(["b", "a"], 1, Mode.CONCURRENCY, LeaseSpec(HOUR, TASK), wait=60.0)
    waiting = asyncio.create_task(storage.acquire(request))
    for _ in range(2000):  # a bound, not a timing: until the request is in the queue
        if await queued(storage):
            break
        await asyncio.sleep(0.005)
    else:
        pytest.fail("the waiting request never queued")
    # Queued: nothing granted, nothing written yet.
    assert len(by_name(await stored_events(storage, [a, b]), builders.ACQUIRED)) == 2
    clock.advance(30)
    admitted_at = clock.now
    assert await storage.release_lease(first.lease_id or "")
    granted = await waiting
    events = await stored_events(storage, [a, b])
    task = {"prefect.resource.id": f"prefect.task-run.{TASK.id}", "prefect.resource.role": "task-run"}
    admitted = [e for e in by_name(events, builders.ACQUIRED) if e.related and e.related[-1] == task]
    assert sorted(e.resource_id for e in admitted) == sorted([rid(a), rid(b)])
    for event in admitted:
        assert event.occurred == admitted_at
        assert event.follows is None
        assert event.resource["slots-acquired"] == "1"
        assert_uuid7(event.id)
    assert one(admitted, builders.ACQUIRED, b).related == [other_limit(a), task]  # request order
    # ... and the admitted grant's release follows them.
    clock.advance(HOUR / 2)
    assert await storage.release_lease(granted.lease_id or "")
    events = await stored_events(storage, [a, b])
    follows = {e.follows for e in by_name(events, builders.RELEASED)}
    assert {e.id for e in admitted} <= follows
    assert len(by_name(events, builders.RELEASED)) == 4


# --- refused changes write nothing ----------------------------------------------------------------


async def test_refused_acquisitions_write_nothing(storage: Storage) -> None:
    await make(storage, "a", 2)
    await make(storage, "b", 1)
    await take(storage, "b")  # b is now full
    before = sorted(e.id for e in await stored_events(storage))
    with pytest.raises(SlotsUnavailable):  # 423: all or nothing, though a had room
        await take(storage, "a", "b")
    with pytest.raises(SlotsUnavailable):  # 423 without a lease too
        await take(storage, "b", lease=None)
    with pytest.raises(InvalidRequest):  # 422: more than a's limit
        await take(storage, "a", slots=3)
    with pytest.raises(InvalidRequest):  # 422: a rate limit without decay
        await take(storage, "a", mode=Mode.RATE_LIMIT)
    nothing = await take(storage, "no-such-limit")  # Prefect answers with a lease id; no slot moved
    assert nothing.limits == []
    assert not await storage.release_lease(nothing.lease_id or "")
    await storage.release_slots(["a"], 1, None)  # nothing to free: no event
    assert sorted(e.id for e in await stored_events(storage)) == before


# --- bugs found -----------------------------------------------------------------------------------


async def test_deleting_a_limit_after_an_unreaped_expiry_still_releases_it(
    storage: Storage, clock: FakeClock
) -> None:
    db = (await make(storage, "db")).limit.id
    other = (await make(storage, "other")).limit.id
    start = clock.now
    await take(storage, "db", "other", lease=30)
    clock.advance(60)  # expired; the reaper has not run yet
    await storage.delete_limit("db")
    await storage.reap_expired()
    events = await stored_events(storage, [db, other])
    assert one(events, builders.RELEASED, other).occurred == start + 30
    released = one(events, builders.RELEASED, db)
    assert released.follows == one(events, builders.ACQUIRED, db).id
    assert released.occurred == start + 30


async def test_releasing_operator_set_slots_has_no_orphan_released_event(storage: Storage) -> None:
    db = (await make(storage, "db", 5, active_slots=2)).limit.id
    await storage.release_slots(["db"], 2, None)
    events = await stored_events(storage, [db])
    acquired = {e.id for e in by_name(events, builders.ACQUIRED)}
    assert all(e.follows in acquired for e in by_name(events, builders.RELEASED))


# --- the property: every grant, every end, exactly once ---------------------------------------------


@dataclass
class ModelLimit:
    id: str
    name: str
    limit: int
    #: Unleased slots (no decay here: they stay until a plain decrement or a deletion).
    pool: int = 0
    #: The acquired event a plain decrement's released event follows (the latest unleased one).
    pool_event: str | None = None


@dataclass
class ModelLease:
    expires: float
    slots: int
    holder: Holder | None
    #: limit id -> the acquired event of that grant (a deleted limit's grant is removed).
    grants: dict[str, str] = field(default_factory=dict)


#: (resource id, follows, slots-acquired, occurred, sorted related): one expected released event.
Released = tuple[str, str | None, str, float, tuple[tuple[tuple[str, str], ...], ...]]


def related_key(related: Sequence[dict[str, str]]) -> tuple[tuple[tuple[str, str], ...], ...]:
    return tuple(sorted(tuple(sorted(r.items())) for r in related))


def released_key(event: EventRecord) -> Released:
    return (
        event.resource_id,
        event.follows,
        event.resource["slots-acquired"],
        event.occurred,
        related_key(event.related),
    )


def lease_release(lease: ModelLease, limit_id: str, occurred: float) -> Released:
    related = [other_limit(i) for i in lease.grants if i != limit_id]
    if lease.holder is not None:
        related.append(builders.holder_resource(lease.holder))
    return (rid(limit_id), lease.grants[limit_id], str(lease.slots), occurred, related_key(related))


NAMES = ["a", "b", "c"]
OP_KINDS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "acquire": st.tuples(
        st.just("acquire"),
        st.lists(st.sampled_from([*NAMES, *NAMES, "missing"]), min_size=1, max_size=3),
        st.sampled_from([1, 1, 1, 2, 2, 3, 5]),  # sometimes over a limit (422) or what is free (423)
        st.sampled_from([None, 0.25, 1.0, 5.0, 60.0, 60.0]),  # lease duration; None: unleased
        st.sampled_from([None, TASK, FLOW]),
    ),
    "release": st.tuples(st.just("release"), st.integers(0, 50)),
    "decrement": st.tuples(
        st.just("decrement"),
        st.lists(st.sampled_from([*NAMES, "missing"]), min_size=1, max_size=3),
        st.integers(1, 3),
    ),
    "advance": st.tuples(st.just("advance"), st.sampled_from([0.25, 0.5, 1.0, 2.0, 30.0, HOUR])),
    "reap": st.tuples(st.just("reap")),
    "delete": st.tuples(st.just("delete"), st.sampled_from(NAMES)),
}
#: Acquisitions most often; deletions rarely (a deleted limit ends the interesting part).
WEIGHTS = {"acquire": 6, "release": 3, "decrement": 2, "advance": 3, "reap": 2, "delete": 1}
OPS = st.sampled_from([k for k, n in WEIGHTS.items() for _ in range(n)]).flatmap(OP_KINDS.__getitem__)


class EventLog:
    """The events of one example's limits, read back after every operation."""

    def __init__(self, storage: Storage, clock: FakeClock, limit_ids: list[str]) -> None:
        self.storage = storage
        self.clock = clock
        self.limit_ids = limit_ids
        self.seen: dict[str, EventRecord] = {}

    async def new(self) -> list[EventRecord]:
        """The events written since the last call (and a check that none went away)."""
        current = await stored_events(self.storage, self.limit_ids)
        fresh = [e for e in current if e.id not in self.seen]
        assert len(current) == len(self.seen) + len(fresh), "a stored event disappeared"
        self.seen.update({e.id: e for e in fresh})
        for event in fresh:
            assert_uuid7(event.id)
            if event.event in builders.SLOT_EVENTS:
                assert event.payload == {}
            # Recorded now, by the operation that wrote it (a reaped lease's released event
            # occurred at the expiry, earlier: it is still received when the reaper ends it).
            assert event.received == self.clock.now
            assert event.occurred <= event.received
        return fresh


def check_released(fresh: Sequence[EventRecord], expected: list[Released]) -> None:
    assert [e.event for e in fresh] == [builders.RELEASED] * len(fresh), fresh
    assert sorted(released_key(e) for e in fresh) == sorted(expected)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(  # the reaper ends a two-limit lease long after its expiry
    sizes=[2, 2, 2],
    ops=[("acquire", ["a", "b"], 1, 1.0, TASK), ("advance", HOUR), ("reap",), ("release", 0)],
)
@example(  # a limit deleted under a live lease, unleased slots and a queue of releases
    sizes=[3, 3, 3],
    ops=[
        ("acquire", ["a", "c"], 1, 60.0, FLOW),
        ("acquire", ["a"], 1, None, None),
        ("acquire", ["a", "b"], 1, None, None),
        ("decrement", ["b", "a"], 1),
        ("delete", "a"),
        ("release", 0),
    ],
)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=len(NAMES), max_size=len(NAMES)),
    ops=st.lists(OPS, min_size=10, max_size=50),
)
async def test_every_grant_and_every_end_has_exactly_its_events(
    storage: Storage, clock: FakeClock, sizes: list[int], ops: list[tuple[Any, ...]]
) -> None:
    # The storage is shared by the examples: each one works on limits of its own.
    prefix = uuid.uuid4().hex[:8]
    model: dict[str, ModelLimit] = {}
    for name, size in zip(NAMES, sizes, strict=True):
        view = await make(storage, f"{prefix}-{name}", size)
        model[name] = ModelLimit(view.limit.id, f"{prefix}-{name}", size)
    log = EventLog(storage, clock, [lim.id for lim in model.values()])
    assert [e.event for e in await log.new()] == [builders.CREATED] * len(NAMES)
    leases: dict[str, ModelLease] = {}
    granted_ids: list[str] = []  # every lease id ever answered: live, ended, or never stored
    leased_acquired: set[str] = set()

    for op in ops:
        kind = op[0]
        if kind == "acquire":
            _, names, slots, duration, holder = op
            spec = LeaseSpec(duration, holder) if duration is not None else None
            request = AcquireRequest([f"{prefix}-{n}" for n in names], slots, Mode.CONCURRENCY, spec)
            try:
                granted = await storage.acquire(request)
            except (SlotsUnavailable, InvalidRequest) as exc:
                tally(f"acquire refused: {type(exc).__name__}")
                assert await log.new() == []  # a refused (rolled-back) acquisition writes nothing
                continue
            found = [model[n] for n in dict.fromkeys(names) if n in model]
            tally(f"acquire granted on {len(found)} limit(s), {'leased' if spec else 'unleased'}")
            fresh = await log.new()
            # Exactly one acquired event per limit of the grant, and nothing else.
            assert [e.event for e in fresh] == [builders.ACQUIRED] * len(found)
            by_limit = {e.resource_id: e for e in fresh}
            assert set(by_limit) == {rid(lim.id) for lim in found}
            for lim in found:
                event = by_limit[rid(lim.id)]
                assert event.resource == {
                    "prefect.resource.id": rid(lim.id),
                    "prefect.resource.name": lim.name,
                    "slots-acquired": str(slots),
                    "limit": str(lim.limit),
                }
                related = [other_limit(o.id) for o in found if o.id != lim.id]
                if spec is not None and holder is not None:
                    related.append(builders.holder_resource(holder))
                assert event.related == related
                assert (event.follows, event.occurred) == (None, clock.now)
                if spec is None:
                    lim.pool += slots
                    lim.pool_event = event.id
                else:
                    leased_acquired.add(event.id)
            if spec is not None:
                assert granted.lease_id is not None
                granted_ids.append(granted.lease_id)
                if found:
                    grants = {lim.id: by_limit[rid(lim.id)].id for lim in found}
                    leases[granted.lease_id] = ModelLease(clock.now + duration, slots, holder, grants)
        elif kind == "release":
            if not granted_ids:
                continue
            lease_id = granted_ids[op[1] % len(granted_ids)]
            lease = leases.pop(lease_id, None)
            assert await storage.release_lease(lease_id) is (lease is not None)
            expected = []
            if lease is not None:  # ended at its expiry if it had expired already
                ended = min(clock.now, lease.expires)
                expected = [lease_release(lease, i, ended) for i in lease.grants]
                tally("release of an expired lease" if ended < clock.now else "release of a live lease")
            check_released(await log.new(), expected)
        elif kind == "decrement":
            _, names, slots = op
            await storage.release_slots([f"{prefix}-{n}" for n in names], slots, None)
            found = [model[n] for n in dict.fromkeys(names) if n in model]
            expected = []
            for lim in found:
                if lim.pool == 0:
                    continue  # nothing freed, nothing written
                freed = min(lim.pool, slots)
                lim.pool -= freed
                related = related_key([other_limit(o.id) for o in found if o.id != lim.id])
                expected.append((rid(lim.id), lim.pool_event, str(freed), clock.now, related))
                tally("decrement freed pool slots")
            check_released(await log.new(), expected)
        elif kind == "advance":
            clock.advance(op[1])
        elif kind == "reap":
            await storage.reap_expired()  # may end other examples' leases too: not read here
            expected = []
            for lease_id in [i for i, lease in leases.items() if lease.expires <= clock.now]:
                lease = leases.pop(lease_id)
                expected += [lease_release(lease, i, lease.expires) for i in lease.grants]
                tally("reaper ended a lease")
            check_released(await log.new(), expected)
        elif kind == "delete":
            lim = model.get(op[1])
            if lim is None:
                continue
            await storage.delete_limit(lim.name)
            del model[op[1]]
            expected = []
            for lease in leases.values():
                if lim.id in lease.grants:
                    # An expired grant the reaper has not ended yet ended at its expiry.
                    expected.append(lease_release(lease, lim.id, min(clock.now, lease.expires)))
                    del lease.grants[lim.id]
                    tally("delete released a holder's grant")
            if lim.pool:
                expected.append((rid(lim.id), lim.pool_event, str(lim.pool), clock.now, ()))
                tally("delete released pool slots")
            fresh = await log.new()
            assert fresh[-1:] and [e.event for e in fresh].count(builders.DELETED) == 1
            deleted = one(fresh, builders.DELETED, lim.id)
            assert deleted.payload == {
                "name": lim.name,
                "limit": lim.limit,
                "active": True,
                "slot_decay_per_second": 0.0,
            }
            check_released([e for e in fresh if e is not deleted], expected)

    # End every lease left, then check the whole story of this example's limits.
    clock.advance(2 * HOUR)
    await storage.reap_expired()
    expected = [lease_release(lease, i, lease.expires) for lease in leases.values() for i in lease.grants]
    check_released(await log.new(), expected)
    events = list(log.seen.values())
    acquired = {e.id: e for e in by_name(events, builders.ACQUIRED)}
    followers: dict[str, int] = {}
    for event in by_name(events, builders.RELEASED):
        # No released event without its acquired: on the same limit, and not before it.
        source = acquired.get(event.follows or "")
        assert source is not None, event
        assert source.resource_id == event.resource_id
        assert source.occurred <= event.occurred
        followers[source.id] = followers.get(source.id, 0) + 1
    # Every leased grant ended (released, reaped, or its limit deleted) exactly once.
    for event_id in leased_acquired:
        assert followers.get(event_id) == 1, acquired[event_id]
