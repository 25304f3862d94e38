"""The tag-based (v1) limits API through the real ASGI app, on SQLite and PostgreSQL.

Every endpoint of ``/api/concurrency_limits`` (``shared/reference/prefect-api.md`` §4.3) with
its statuses and Prefect's exact messages; the exact v1 slot events (§7.3 and
``shared/reference/concurrency-events.md``) for a one-tag and a two-tag increment; and the places
where slotkeeper fixes Prefect's v1 defects (contract item 4): reset frees the slots, the filter
pages over tag limits only, an invalid tag or a negative limit is 422, a release works after the
limit was lowered to 0, the decrement names tags as the increment does, and abandoned holds are
reclaimed when ``SLOTKEEPER_V1_HOLD_TTL_SECONDS`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.models import AcquireRequest, LeaseSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock

V1 = "/concurrency_limits"
V2 = "/v2/concurrency_limits"
NOT_FOUND = {"detail": "Concurrency limit not found", "code": "limit_not_found"}
ROUTE_NOT_FOUND = {"detail": "Not Found", "code": "route_not_found"}
HUNDRED_YEARS = 100 * 365 * 86400.0
#: The default cap of Retry-After for ``tag:`` limits (``SLOTKEEPER_TAG_SLOT_WAIT_SECONDS``).
TAG_RETRY_CAP = 10.0
ACQUIRED = "prefect.concurrency-limit.v1.acquired"
RELEASED = "prefect.concurrency-limit.v1.released"


def iso(ts: float) -> str:
    """An epoch time as the API writes it, computed independently of the server."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def run_id() -> str:
    return str(uuid.uuid4())


def deadlock(tag: str) -> dict[str, str]:
    return {
        "detail": f'The concurrency limit on tag "{tag}" is 0 and will deadlock if the task tries to run again.',
        "code": "limit_is_zero",
    }


def reached(tag: str) -> dict[str, str]:
    return {"detail": f"Concurrency limit for the {tag} tag has been reached", "code": "slots_unavailable"}


def v1_rid(limit_id: str) -> str:
    return f"prefect.concurrency-limit.v1.{limit_id}"


# --- helpers --------------------------------------------------------------------------------------


async def upsert(client: httpx.AsyncClient, tag: str, limit: int, status: int = 201) -> dict[str, Any]:
    r = await client.post(f"{V1}/", json={"tag": tag, "concurrency_limit": limit})
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    return body


async def read_tag(client: httpx.AsyncClient, tag: str) -> dict[str, Any]:
    r = await client.get(f"{V1}/tag/{tag}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def holders(client: httpx.AsyncClient, tag: str) -> list[str]:
    found: list[str] = (await read_tag(client, tag))["active_slots"]
    return found


async def increment(client: httpx.AsyncClient, names: list[str], task_run_id: str) -> httpx.Response:
    return await client.post(f"{V1}/increment", json={"names": names, "task_run_id": task_run_id})


async def hold(client: httpx.AsyncClient, names: list[str], task_run_id: str) -> list[dict[str, Any]]:
    r = await increment(client, names, task_run_id)
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


async def decrement(
    client: httpx.AsyncClient, names: list[str], task_run_id: str, **extra: Any
) -> httpx.Response:
    return await client.post(f"{V1}/decrement", json={"names": names, "task_run_id": task_run_id, **extra})


async def tag_filter(client: httpx.AsyncClient, body: Any = None) -> list[dict[str, Any]]:
    r = await client.post(f"{V1}/filter", json=body)
    assert r.status_code == 200, r.text
    page: list[dict[str, Any]] = r.json()
    return page


async def every_limit(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every limit (v2 view) with its live leases: what a refused request must leave alone."""
    r = await client.post(f"{V2}/filter")
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = []
    for lim in r.json():
        leases = await client.get(f"{V2}/{lim['id']}/leases")
        out.append({**lim, "leases": leases.json()})
    return out


async def lease_rows(storage: Storage) -> int:
    row = await storage.backend.run(lambda tx: tx.one("SELECT COUNT(*) FROM leases"))
    assert row is not None
    count: int = row[0]
    return count


async def events(client: httpx.AsyncClient, *names: str) -> list[dict[str, Any]]:
    """The stored events with these names (all when none), oldest first, as the API serves them."""
    criteria: dict[str, Any] = {"event": {"name": list(names)}} if names else {}
    body = {
        "filter": {
            "occurred": {"since": "2000-01-01T00:00:00Z", "until": "2200-01-01T00:00:00Z"},
            "order": "ASC",
            **criteria,
        },
        "limit": 50,
    }
    r = await client.post("/events/filter", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["next_page"] is None  # one page is enough here
    page: list[dict[str, Any]] = answer["events"]
    return page


def only(found: list[dict[str, Any]], limit_id: str) -> dict[str, Any]:
    """The one event of this list on this limit's v1 resource."""
    mine = [e for e in found if e["resource"]["prefect.resource.id"] == v1_rid(limit_id)]
    assert len(mine) == 1, mine
    return mine[0]


def invalid(r: httpx.Response) -> list[tuple[str, list[Any]]]:
    """Prefect's request-validation shape; returns (type, loc) of each error."""
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"exception_message", "exception_detail", "request_body", "code"}
    assert body["code"] == "invalid_request"
    assert body["exception_message"] == "Invalid request received."
    return [(d["type"], d["loc"]) for d in body["exception_detail"]]


@contextlib.asynccontextmanager
async def serve(storage: Storage, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app built with other settings than the ``client`` fixture's."""
    app = create_app(settings, storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            yield http


# --- create (upsert): 201 / 200 / 422 -------------------------------------------------------------


async def test_create_is_201_then_the_same_tag_is_updated_with_200(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    created = await upsert(client, "db", 2)
    assert created == {
        "id": created["id"],
        "created": iso(clock()),
        "updated": iso(clock()),
        "tag": "db",
        "concurrency_limit": 2,
        "active_slots": [],
    }
    uuid.UUID(created["id"])
    clock.advance(5)
    updated = await upsert(client, "db", 7, status=200)
    assert updated == {**created, "updated": iso(clock()), "concurrency_limit": 7}
    # It is the global limit tag:db, with v2's lifecycle events.
    v2 = (await client.get(f"{V2}/tag:db")).json()
    assert (v2["id"], v2["name"], v2["limit"], v2["active"]) == (created["id"], "tag:db", 7, True)
    lifecycle = await events(client, "prefect.concurrency-limit.created", "prefect.concurrency-limit.updated")
    assert [(e["event"], e["resource"], e["payload"]) for e in lifecycle] == [
        (
            f"prefect.concurrency-limit.{kind}",
            {
                "prefect.resource.id": f"prefect.concurrency-limit.{created['id']}",
                "prefect.resource.name": "tag:db",
            },
            {"name": "tag:db", "limit": limit, "active": True, "slot_decay_per_second": 0.0},
        )
        for kind, limit in (("created", 2), ("updated", 7))
    ]


async def test_create_refuses_invalid_bodies_with_422(client: httpx.AsyncClient) -> None:
    cases: list[tuple[Any, str, list[Any]]] = [
        # A tag that cannot form a valid limit name (Prefect: 500).
        ({"tag": "a/b", "concurrency_limit": 1}, "string_pattern_mismatch", ["body", "tag"]),
        ({"tag": "50%", "concurrency_limit": 1}, "string_pattern_mismatch", ["body", "tag"]),
        ({"tag": "<x>", "concurrency_limit": 1}, "string_pattern_mismatch", ["body", "tag"]),
        ({"tag": "", "concurrency_limit": 1}, "string_too_short", ["body", "tag"]),
        ({"tag": " ", "concurrency_limit": 1}, "value_error", ["body", "tag"]),  # Prefect accepts it
        ({"tag": "x" * 1021, "concurrency_limit": 1}, "string_too_long", ["body", "tag"]),
        ({"tag": "a\x00b", "concurrency_limit": 1}, "value_error", ["body", "tag"]),
        ({"tag": 5, "concurrency_limit": 1}, "string_type", ["body", "tag"]),
        # A negative limit (Prefect accepts it).
        ({"tag": "db", "concurrency_limit": -3}, "greater_than_equal", ["body", "concurrency_limit"]),
        ({"tag": "db", "concurrency_limit": 1.5}, "int_from_float", ["body", "concurrency_limit"]),
        ({"tag": "db", "concurrency_limit": 2**31}, "less_than_equal", ["body", "concurrency_limit"]),
        ({"tag": "db"}, "missing", ["body", "concurrency_limit"]),
        ({"concurrency_limit": 1}, "missing", ["body", "tag"]),
        ({"tag": "db", "concurrency_limit": 1, "active": True}, "extra_forbidden", ["body", "active"]),
    ]
    for body, kind, loc in cases:
        r = await client.post(f"{V1}/", json=body)
        assert invalid(r) == [(kind, loc)], body
        assert r.json()["request_body"] == body
    assert await tag_filter(client) == []
    # The longest tag that fits a limit name is accepted.
    await upsert(client, "x" * 1020, 1)


async def test_create_accepts_what_a_limit_name_accepts(client: httpx.AsyncClient) -> None:
    for tag in ("a b:c ü", "tag:nested", "4641973e-7063-47b7-8033-015e116d3bdc"):
        created = await upsert(client, tag, 1)
        assert created["tag"] == tag
        assert (await client.get(f"{V1}/{created['id']}")).json()["tag"] == tag


# --- read: 200 / 404 ------------------------------------------------------------------------------


async def test_read_by_id_and_by_tag_show_the_holders(client: httpx.AsyncClient) -> None:
    created = await upsert(client, "db", 4)
    first, second = run_id(), run_id()
    await hold(client, ["db"], first)
    await hold(client, ["db"], second)
    await hold(client, ["db"], first)  # a second hold of the same run is listed once
    by_tag = await read_tag(client, "db")
    assert by_tag["active_slots"] == [first, second]
    assert (await client.get(f"{V1}/{created['id']}")).json() == by_tag
    assert (await client.get(f"{V1}/{created['id'].upper()}")).json() == by_tag
    # Task runs holding the tag through v2 leases count too (Prefect's task engine does that).
    third = run_id()
    r = await client.post(
        f"{V2}/increment-with-lease",
        json={"names": ["tag:db"], "slots": 1, "holder": {"type": "task_run", "id": third}},
    )
    assert r.status_code == 200, r.text
    assert await holders(client, "db") == [first, second, third]


async def test_read_of_an_unknown_or_non_tag_limit_is_404(client: httpx.AsyncClient) -> None:
    plain = (await client.post(f"{V2}/", json={"name": "plain", "limit": 1})).json()
    await upsert(client, "db", 1)
    for path in (f"{V1}/{uuid.uuid4()}", f"{V1}/{plain['id']}", f"{V1}/tag/plain", f"{V1}/tag/missing"):
        r = await client.get(path)
        assert (r.status_code, r.json()) == (404, NOT_FOUND), path
    # Ids are UUIDs: anything else matches no route, as in Prefect.
    for method in ("GET", "DELETE"):
        r = await client.request(method, f"{V1}/not-a-uuid")
        assert (r.status_code, r.json()) == (404, ROUTE_NOT_FOUND), method
    r = await client.get(f"{V1}/tag/a%00b")
    assert invalid(r) == [("value_error", ["path", "tag"])]


# --- filter ---------------------------------------------------------------------------------------


async def test_filter_lists_tag_limits_only_ordered_and_paged(client: httpx.AsyncClient) -> None:
    # Plain limits sort before and after "tag:": Prefect lets them use up the page.
    for name in ("aaa0", "aaa1", "aaa2", "zzz"):
        assert (await client.post(f"{V2}/", json={"name": name, "limit": 1})).status_code == 201
    for tag in ("t3", "t1", "t2"):
        await upsert(client, tag, 1)
    tags = [lim["tag"] for lim in await tag_filter(client)]
    assert tags == ["t1", "t2", "t3"]
    assert [lim["tag"] for lim in await tag_filter(client, {"limit": 3})] == ["t1", "t2", "t3"]
    assert [lim["tag"] for lim in await tag_filter(client, {"limit": 1})] == ["t1"]
    assert [lim["tag"] for lim in await tag_filter(client, {"limit": 2, "offset": 1})] == ["t2", "t3"]
    assert await tag_filter(client, {"offset": 3}) == []
    assert await tag_filter(client, {"limit": 0}) == []
    assert await tag_filter(client, {}) == await tag_filter(client)
    assert (await tag_filter(client))[0] == await read_tag(client, "t1")


async def test_filter_refuses_bad_pages(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{V1}/filter", json={"limit": 201})
    assert (r.status_code, r.json()) == (
        422,
        {"detail": "Invalid limit: must be less than or equal to 200.", "code": "invalid_request"},
    )
    r = await client.post(f"{V1}/filter", json={"limit": -1})
    assert (r.status_code, r.json()) == (
        422,
        {"detail": "Invalid limit: must be greater than or equal to 0.", "code": "invalid_request"},
    )
    assert invalid(await client.post(f"{V1}/filter", json={"offset": -1})) == [
        ("greater_than_equal", ["body", "offset"])
    ]
    assert invalid(await client.post(f"{V1}/filter", json={"tags": ["x"]})) == [
        ("extra_forbidden", ["body", "tags"])
    ]


# --- increment ------------------------------------------------------------------------------------


async def test_increment_holds_one_slot_per_tag_as_one_hold(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    a = await upsert(client, "a", 2)
    b = await upsert(client, "b", 1)
    await client.post(f"{V2}/", json={"name": "c", "limit": 1})  # not a tag: "c" is unknown
    task_run = run_id()
    held = await hold(client, ["b", "missing", "a", "c"], task_run)
    assert held == [{"id": b["id"], "name": "b", "limit": 1}, {"id": a["id"], "name": "a", "limit": 2}]
    assert await holders(client, "a") == await holders(client, "b") == [task_run]
    (lease_a,) = (await client.get(f"{V2}/tag:a/leases")).json()
    (lease_b,) = (await client.get(f"{V2}/tag:b/leases")).json()
    assert lease_a["lease_id"] == lease_b["lease_id"]  # one hold for the whole increment
    assert lease_a["holder"] == {"type": "task_run", "id": task_run}
    assert lease_a["slots"] == 1
    assert lease_a["expires"] == iso(clock() + HUNDRED_YEARS)  # v1 clients cannot renew
    assert (await client.get(f"{V2}/tag:a")).json()["active_slots"] == 1
    assert (await client.get(f"{V2}/c")).json()["active_slots"] == 0
    assert await hold(client, ["missing"], task_run) == []
    assert await hold(client, [], task_run) == []


async def test_increment_of_a_full_tag_is_423_naming_it_with_a_retry_after(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await upsert(client, "roomy", 5)
    await upsert(client, "full", 1)
    await hold(client, ["full"], run_id())
    clock.advance(1)
    before = await every_limit(client)
    r = await increment(client, ["roomy", "full"], run_id())
    assert (r.status_code, r.json()) == (423, reached("full"))  # Prefect names the first tag
    header = r.headers["Retry-After"]
    assert "." in header and 0 < float(header) <= TAG_RETRY_CAP
    assert await every_limit(client) == before  # all or nothing


async def test_increment_of_a_zero_tag_is_423_without_retry_after(client: httpx.AsyncClient) -> None:
    await upsert(client, "open", 5)
    await upsert(client, "closed", 0)
    await upsert(client, "off", 0)
    assert (await client.patch(f"{V2}/tag:off", json={"active": False})).status_code == 204
    for names, tag in ((["open", "closed"], "closed"), (["off"], "off"), (["off", "closed"], "off")):
        before = await every_limit(client)
        r = await increment(client, names, run_id())
        assert (r.status_code, r.json()) == (423, deadlock(tag)), names
        assert "Retry-After" not in r.headers  # Prefect's v1 client gives up instead of waiting
        assert await every_limit(client) == before


async def test_increment_skips_an_inactive_tag(client: httpx.AsyncClient, storage: Storage) -> None:
    on = await upsert(client, "on", 1)
    await upsert(client, "off", 1)
    assert (await client.patch(f"{V2}/tag:off", json={"active": False})).status_code == 204
    task_run = run_id()
    assert await hold(client, ["off"], task_run) == []
    assert await lease_rows(storage) == 0  # nothing held, nothing recorded
    assert await hold(client, ["off", "on"], task_run) == [{"id": on["id"], "name": "on", "limit": 1}]
    assert await holders(client, "off") == []


async def test_increment_refuses_invalid_bodies_with_422(client: httpx.AsyncClient) -> None:
    await upsert(client, "db", 1)
    task_run = run_id()
    cases: list[tuple[Any, list[tuple[str, list[Any]]]]] = [
        ({"names": ["db"]}, [("missing", ["body", "task_run_id"])]),
        ({"names": ["db"], "task_run_id": "run-1"}, [("uuid_parsing", ["body", "task_run_id"])]),
        ({"task_run_id": task_run}, [("missing", ["body", "names"])]),
        ({"names": "db", "task_run_id": task_run}, [("list_type", ["body", "names"])]),
        ({"names": ["d\x00b"], "task_run_id": task_run}, [("value_error", ["body", "names", 0])]),
        ({"names": ["db"], "task_run_id": task_run, "slots": 2}, [("extra_forbidden", ["body", "slots"])]),
    ]
    for body, errors in cases:
        before = await every_limit(client)
        assert invalid(await client.post(f"{V1}/increment", json=body)) == errors, body
        assert await every_limit(client) == before


async def test_increment_does_not_barge_past_queued_waiters(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    await upsert(client, "db", 1)
    holder = run_id()
    await hold(client, ["db"], holder)
    # A v2 request waits on the server for the tag's slot.
    waiting = asyncio.create_task(
        storage.acquire(AcquireRequest(["tag:db"], 1, lease=LeaseSpec(60.0), wait=30.0))
    )
    for _ in range(400):
        queued = await storage.backend.run(lambda tx: tx.one("SELECT COUNT(*) FROM waiters"))
        if queued and queued[0]:
            break
        await asyncio.sleep(0.005)
    r = await increment(client, ["db"], run_id())
    assert (r.status_code, r.json()) == (423, reached("db"))
    assert float(r.headers["Retry-After"]) > 0
    # The v1 release hands the slot to the head of the queue, in the same transaction.
    await decrement(client, ["db"], holder)
    granted = await asyncio.wait_for(waiting, 10)
    assert [lim.name for lim in granted.limits] == ["tag:db"]
    assert (await increment(client, ["db"], run_id())).status_code == 423


# --- decrement ------------------------------------------------------------------------------------


async def test_decrement_ends_the_runs_holds_and_names_tags_as_increment(client: httpx.AsyncClient) -> None:
    a = await upsert(client, "a", 2)
    b = await upsert(client, "b", 2)
    mine, theirs = run_id(), run_id()
    await hold(client, ["a", "b"], mine)
    await hold(client, ["a"], theirs)
    # occupancy_seconds is what Prefect's v1 client sends: accepted (and measured by the server).
    r = await decrement(client, ["a", "missing"], mine, occupancy_seconds=4.2)
    assert (r.status_code, r.json()) == (200, [{"id": a["id"], "name": "a", "limit": 2}])
    assert await holders(client, "a") == [theirs]
    assert await holders(client, "b") == []  # the hold was one increment: all its tags end
    # Nothing held any more: still 200, listing every tag found (Prefect does the same).
    r = await decrement(client, ["b", "a"], mine)
    assert (r.status_code, r.json()) == (
        200,
        [{"id": b["id"], "name": "b", "limit": 2}, {"id": a["id"], "name": "a", "limit": 2}],
    )
    assert (await decrement(client, ["missing"], mine)).json() == []
    assert (await decrement(client, [], mine)).json() == []
    assert await holders(client, "a") == [theirs]
    await hold(client, ["a"], run_id())  # the freed slot is free


async def test_decrement_refuses_invalid_bodies_with_422(client: httpx.AsyncClient) -> None:
    await upsert(client, "db", 1)
    task_run = run_id()
    await hold(client, ["db"], task_run)
    cases: list[tuple[Any, list[tuple[str, list[Any]]]]] = [
        ({"names": ["db"]}, [("missing", ["body", "task_run_id"])]),
        ({"names": ["db"], "task_run_id": "12"}, [("uuid_parsing", ["body", "task_run_id"])]),
        ({"names": ["db"], "task_run_id": task_run, "slots": 1}, [("extra_forbidden", ["body", "slots"])]),
        (
            {"names": ["db"], "task_run_id": task_run, "occupancy_seconds": "long"},
            [("float_parsing", ["body", "occupancy_seconds"])],
        ),
    ]
    for body, errors in cases:
        assert invalid(await client.post(f"{V1}/decrement", json=body)) == errors, body
    assert await holders(client, "db") == [task_run]


async def test_release_works_after_the_limit_was_lowered_to_zero(client: httpx.AsyncClient) -> None:
    await upsert(client, "db", 1)
    task_run = run_id()
    await hold(client, ["db"], task_run)
    await upsert(client, "db", 0, status=200)
    r = await decrement(client, ["db"], task_run, occupancy_seconds=1.0)
    assert r.status_code == 200, r.text
    assert await holders(client, "db") == []
    assert (await client.get(f"{V2}/tag:db")).json()["active_slots"] == 0
    r = await increment(client, ["db"], task_run)
    assert (r.status_code, r.json()) == (423, deadlock("db"))


# --- reset ----------------------------------------------------------------------------------------


async def test_reset_frees_the_slots(client: httpx.AsyncClient) -> None:
    await upsert(client, "db", 2)
    stuck = run_id()
    await hold(client, ["db"], stuck)
    assert (await client.post(f"{V2}/increment", json={"names": ["tag:db"], "slots": 1})).status_code == 200
    assert (await increment(client, ["db"], run_id())).status_code == 423
    r = await client.post(f"{V1}/tag/db/reset", json={"slot_override": None})
    assert (r.status_code, r.content) == (200, b"null")
    assert await holders(client, "db") == []
    # Unlike Prefect, the count is freed with the holders: the limit takes two new holds.
    assert (await client.get(f"{V2}/tag:db")).json()["active_slots"] == 0
    await hold(client, ["db"], run_id())
    await hold(client, ["db"], run_id())
    # The reset hold is gone: its run's decrement is harmless and frees nothing.
    assert (await decrement(client, ["db"], stuck)).status_code == 200
    assert len(await holders(client, "db")) == 2
    # Without a body too.
    assert (await client.post(f"{V1}/tag/db/reset")).status_code == 200
    assert await holders(client, "db") == []


async def test_reset_with_an_override_names_the_holders(client: httpx.AsyncClient) -> None:
    await upsert(client, "db", 1)
    first, second = run_id(), run_id()
    await hold(client, ["db"], run_id())
    r = await client.post(f"{V1}/tag/db/reset", json={"slot_override": [first, second, first]})
    assert (r.status_code, r.json()) == (200, None)
    # Each named run holds one slot, even beyond the limit; newcomers wait until enough release.
    assert await holders(client, "db") == [first, second]
    assert (await client.get(f"{V2}/tag:db")).json()["active_slots"] == 2
    assert (await increment(client, ["db"], run_id())).status_code == 423
    await decrement(client, ["db"], first)
    assert (await increment(client, ["db"], run_id())).status_code == 423
    await decrement(client, ["db"], second)
    await hold(client, ["db"], run_id())


async def test_reset_of_one_tag_keeps_a_holds_other_tags(client: httpx.AsyncClient) -> None:
    a = await upsert(client, "a", 1)
    b = await upsert(client, "b", 1)
    task_run = run_id()
    await hold(client, ["a", "b"], task_run)
    assert (await client.post(f"{V1}/tag/a/reset", json={})).status_code == 200
    assert await holders(client, "a") == []
    assert await holders(client, "b") == [task_run]
    await decrement(client, ["b"], task_run)
    assert await holders(client, "b") == []
    released = await events(client, RELEASED)
    # One released event per tag, each following its acquired event: at the reset, then at the
    # decrement (whose hold then held "b" alone).
    acquired = await events(client, ACQUIRED)
    assert [e["resource"]["prefect.resource.id"] for e in released] == [v1_rid(a["id"]), v1_rid(b["id"])]
    assert [e["follows"] for e in released] == [only(acquired, a["id"])["id"], only(acquired, b["id"])["id"]]


async def test_reset_refuses_bad_requests(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{V1}/tag/missing/reset", json={"slot_override": None})
    assert (r.status_code, r.json()) == (404, NOT_FOUND)
    await upsert(client, "db", 1)
    task_run = run_id()
    await hold(client, ["db"], task_run)
    for body, errors in (
        ({"slot_override": ["x"]}, [("uuid_parsing", ["body", "slot_override", 0])]),
        ({"slot_override": "x"}, [("list_type", ["body", "slot_override"])]),
        ({"slots": []}, [("extra_forbidden", ["body", "slots"])]),
    ):
        assert invalid(await client.post(f"{V1}/tag/db/reset", json=body)) == errors, body
    assert await holders(client, "db") == [task_run]


# --- delete ---------------------------------------------------------------------------------------


async def test_delete_by_id_and_by_tag(client: httpx.AsyncClient, storage: Storage) -> None:
    one = await upsert(client, "one", 1)
    await upsert(client, "two", 1)
    plain = (await client.post(f"{V2}/", json={"name": "plain", "limit": 1})).json()
    task_run = run_id()
    await hold(client, ["one"], task_run)
    await hold(client, ["two"], task_run)
    r = await client.delete(f"{V1}/{one['id']}")
    assert (r.status_code, r.content) == (200, b"null")
    r = await client.delete(f"{V1}/tag/two")
    assert (r.status_code, r.content) == (200, b"null")
    assert await lease_rows(storage) == 0  # their holds ended with them
    for path in (f"{V1}/{one['id']}", f"{V1}/tag/two", f"{V1}/{plain['id']}", f"{V1}/tag/plain"):
        r = await client.delete(path)
        assert (r.status_code, r.json()) == (404, NOT_FOUND), path
    assert (await client.get(f"{V2}/plain")).status_code == 200  # not a tag limit: untouched
    assert await tag_filter(client) == []
    deleted = await events(client, "prefect.concurrency-limit.deleted")
    assert [e["resource"]["prefect.resource.name"] for e in deleted] == ["tag:one", "tag:two"]
    # Each hold's release is recorded before the deletion, following its acquisition.
    released = await events(client, RELEASED)
    acquired = await events(client, ACQUIRED)
    assert [e["follows"] for e in released] == [e["id"] for e in acquired]


async def test_deleting_one_tag_of_a_hold_keeps_its_other_tags(client: httpx.AsyncClient) -> None:
    await upsert(client, "a", 1)
    await upsert(client, "b", 1)
    task_run = run_id()
    await hold(client, ["a", "b"], task_run)
    assert (await client.delete(f"{V1}/tag/a")).status_code == 200
    assert await holders(client, "b") == [task_run]
    assert (await decrement(client, ["a", "b"], task_run)).json()[0]["name"] == "b"
    assert await holders(client, "b") == []


async def test_v2_paths_end_v1_holds_with_v1_events(client: httpx.AsyncClient, storage: Storage) -> None:
    a = await upsert(client, "a", 1)
    b = await upsert(client, "b", 1)
    task_run = run_id()
    await hold(client, ["a"], task_run)
    await hold(client, ["b"], task_run)
    (lease,) = (await client.get(f"{V2}/tag:a/leases")).json()
    r = await client.post(f"{V2}/decrement-with-lease", json={"lease_id": lease["lease_id"]})
    assert r.status_code == 204
    assert (await client.delete(f"{V2}/tag:b")).status_code == 204
    assert await lease_rows(storage) == 0
    assert await events(client, "prefect.concurrency-limit.released") == []
    released = await events(client, RELEASED)
    assert [(e["resource"]["prefect.resource.name"], e["resource"]["task_run_id"]) for e in released] == [
        ("a", task_run),
        ("b", task_run),
    ]
    assert [e["resource"]["prefect.resource.id"] for e in released] == [v1_rid(a["id"]), v1_rid(b["id"])]


# --- events ---------------------------------------------------------------------------------------


async def test_events_of_a_one_tag_hold(client: httpx.AsyncClient, clock: FakeClock) -> None:
    db = await upsert(client, "db", 3)
    task_run = run_id()
    await hold(client, ["db"], task_run)
    taken = clock()
    clock.advance(7.5)
    await decrement(client, ["db"], task_run, occupancy_seconds=7.5)
    acquired, released = await events(client, ACQUIRED, RELEASED)
    resource = {
        "prefect.resource.id": f"prefect.concurrency-limit.v1.{db['id']}",
        "prefect.resource.name": "db",
        "limit": "3",
        "task_run_id": task_run,
    }
    assert acquired == {
        "occurred": iso(taken),
        "event": "prefect.concurrency-limit.v1.acquired",
        "resource": resource,
        "related": [],
        "payload": {},
        "id": acquired["id"],
        "follows": None,
        "received": iso(taken),
    }
    assert released == {
        "occurred": iso(clock()),
        "event": "prefect.concurrency-limit.v1.released",
        "resource": resource,
        "related": [],
        "payload": {},
        "id": released["id"],
        "follows": acquired["id"],
        "received": iso(clock()),
    }
    for event in (acquired, released):
        assert uuid.UUID(event["id"]).version == 7
    # Only the v1 pair: no v2 slot event for a v1 hold.
    assert (
        await events(client, "prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released") == []
    )


async def test_events_of_a_two_tag_hold(client: httpx.AsyncClient, clock: FakeClock) -> None:
    a = await upsert(client, "a", 2)
    b = await upsert(client, "b", 5)
    task_run = run_id()
    await hold(client, ["b", "a"], task_run)
    taken = clock()
    clock.advance(3)
    await upsert(client, "b", 4, status=200)  # the released event carries the limit as it is then
    await decrement(client, ["a", "b"], task_run)
    found = await events(client, ACQUIRED, RELEASED)
    assert len(found) == 4

    def resource(lim: dict[str, Any], limit: int) -> dict[str, str]:
        return {
            "prefect.resource.id": f"prefect.concurrency-limit.v1.{lim['id']}",
            "prefect.resource.name": lim["tag"],
            "limit": str(limit),
            "task_run_id": task_run,
        }

    def related(lim: dict[str, Any]) -> list[dict[str, str]]:
        return [
            {
                "prefect.resource.id": f"prefect.concurrency-limit.v1.{lim['id']}",
                "prefect.resource.role": "concurrency-limit",
            }
        ]

    acquired = [e for e in found if e["event"] == ACQUIRED]
    released = [e for e in found if e["event"] == RELEASED]
    for lim, other, before, after in ((a, b, 2, 2), (b, a, 5, 4)):
        got = only(acquired, lim["id"])
        assert got == {
            "occurred": iso(taken),
            "event": ACQUIRED,
            "resource": resource(lim, before),
            "related": related(other),
            "payload": {},
            "id": got["id"],
            "follows": None,
            "received": iso(taken),
        }
        gone = only(released, lim["id"])
        assert gone == {
            "occurred": iso(clock()),
            "event": RELEASED,
            "resource": resource(lim, after),
            "related": related(other),
            "payload": {},
            "id": gone["id"],
            "follows": got["id"],
            "received": iso(clock()),
        }


async def test_a_refused_increment_writes_no_event(client: httpx.AsyncClient) -> None:
    await upsert(client, "full", 1)
    await upsert(client, "zero", 0)
    await hold(client, ["full"], run_id())
    before = await events(client)
    assert (await increment(client, ["full"], run_id())).status_code == 423
    assert (await increment(client, ["zero"], run_id())).status_code == 423
    assert await events(client) == before


# --- hold lifetime --------------------------------------------------------------------------------


async def test_a_crashed_holder_is_reclaimed_when_a_ttl_is_set(
    storage: Storage, clock: FakeClock, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, reaper_interval_seconds=0.05, v1_hold_ttl_seconds=120)
    async with serve(storage, settings) as client:
        db = await upsert(client, "db", 1)
        crashed = run_id()
        await hold(client, ["db"], crashed)
        taken = clock()
        (lease,) = (await client.get(f"{V2}/tag:db/leases")).json()
        assert lease["expires"] == iso(taken + 120)
        clock.advance(119)
        assert (await increment(client, ["db"], run_id())).status_code == 423
        clock.advance(2)
        # The hold stopped counting at its expiry; the app's reaper ends it and records it.
        for _ in range(400):
            if await lease_rows(storage) == 0:
                break
            await asyncio.sleep(0.005)
        assert await lease_rows(storage) == 0
        acquired, released = await events(client, ACQUIRED, RELEASED)
        assert released["occurred"] == iso(taken + 120)  # released at its expiry, not when reaped
        assert released["follows"] == acquired["id"]
        assert released["resource"] == {
            "prefect.resource.id": v1_rid(db["id"]),
            "prefect.resource.name": "db",
            "limit": "1",
            "task_run_id": crashed,
        }
        await hold(client, ["db"], run_id())
        # The crashed run's late decrement finds nothing of its own to end.
        assert (await decrement(client, ["db"], crashed)).status_code == 200
        assert len(await holders(client, "db")) == 1


def test_the_hold_ttl_setting_is_bounded() -> None:
    assert Settings().v1_hold_ttl_seconds is None
    with pytest.raises(ValueError, match="v1_hold_ttl_seconds"):
        Settings(v1_hold_ttl_seconds=0)
    with pytest.raises(ValueError, match="v1_hold_ttl_seconds"):
        Settings(v1_hold_ttl_seconds=HUNDRED_YEARS + 1)
