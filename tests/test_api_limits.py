"""The v2 limits API through the real ASGI app, on SQLite and PostgreSQL.

Every endpoint of ``/api/v2/concurrency_limits`` and every status code of its matrix
(``shared/reference/prefect-api.md`` §2.13), with Prefect's exact messages and body shapes. Where
slotkeeper deliberately differs from Prefect (UUID names refused, renew past expiry is 410, decay
keeps fractions, leased slots do not decay, ...) the test pins slotkeeper's behaviour and says so.

Every refused request is also checked to change nothing: :func:`refused` compares every limit and
every live lease before and after, with the clock moved on so that any write would show in
``updated``. Tables of invalid bodies run in one test each (the app is rebuilt per test, and that
is what costs), every case named in its assertion message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.errors import CODES
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock

V2 = "/v2/concurrency_limits"
JSON = {"content-type": "application/json"}
NOT_FOUND = {"detail": "Concurrency Limit not found", "code": "limit_not_found"}
LEASE_GONE = {"detail": "Lease not found - it may have expired or been revoked", "code": "lease_gone"}
SLOTS_OVER_LIMIT = {"detail": "Slots requested is greater than the limit", "code": "slots_exceed_limit"}
TOO_LARGE = {"detail": "Request body is larger than 1024 bytes.", "code": "body_too_large"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
HOLDER = {"type": "task_run", "id": "0b6b2f4e-8c0a-4a55-9b5c-3a8c1c2f8f10"}
UUID_NAME = "4641973e-7063-47b7-8033-015e116d3bdc"
#: The default cap on Retry-After (``maximum_slot_wait_seconds``).
RETRY_AFTER_CAP = 30.0

#: An invalid request: (what it shows, body as JSON value or raw bytes, error type, error loc).
#: The type may list alternatives (``a|b``) where FastAPI's and pydantic's JSON parsers differ.
Case = tuple[str, Any, str, list[Any]]


def iso(ts: float) -> str:
    """An epoch time as the API writes it."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- helpers --------------------------------------------------------------------------------------


async def create(
    client: httpx.AsyncClient, name: str = "db", limit: int = 1, **fields: Any
) -> dict[str, Any]:
    r = await client.post(f"{V2}/", json={"name": name, "limit": limit, **fields})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def read(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    r = await client.get(f"{V2}/{key}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def active(client: httpx.AsyncClient, key: str) -> int:
    slots: int = (await read(client, key))["active_slots"]
    return slots


async def increment(
    client: httpx.AsyncClient, names: list[str], slots: int = 1, **fields: Any
) -> httpx.Response:
    return await client.post(f"{V2}/increment", json={"names": names, "slots": slots, **fields})


async def with_lease(
    client: httpx.AsyncClient, names: list[str], slots: int = 1, **fields: Any
) -> httpx.Response:
    return await client.post(f"{V2}/increment-with-lease", json={"names": names, "slots": slots, **fields})


async def take_lease(client: httpx.AsyncClient, names: list[str], slots: int = 1, **fields: Any) -> str:
    r = await with_lease(client, names, slots, **fields)
    assert r.status_code == 200, r.text
    lease_id: str = r.json()["lease_id"]
    return lease_id


async def release(client: httpx.AsyncClient, lease_id: str) -> httpx.Response:
    return await client.post(f"{V2}/decrement-with-lease", json={"lease_id": lease_id})


async def renew(client: httpx.AsyncClient, lease_id: str, **body: Any) -> httpx.Response:
    return await client.post(f"{V2}/leases/{lease_id}/renew", json=body or None)


async def leases(client: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    r = await client.get(f"{V2}/{key}/leases")
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


async def state(client: httpx.AsyncClient) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every limit as GET shows it, with its live leases."""
    r = await client.post(f"{V2}/filter")
    assert r.status_code == 200, r.text
    return [(lim, await leases(client, lim["id"])) for lim in r.json()]


async def refused(
    client: httpx.AsyncClient,
    clock: FakeClock,
    status: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    case: str = "",
) -> httpx.Response:
    """Send a request that must answer ``status`` and leave every limit and lease as it was.

    ``body`` is sent as JSON, or as it is when it is ``bytes`` (with a JSON content type).
    """
    clock.advance(1)  # any write now stamps a new ``updated``
    before = await state(client)
    if isinstance(body, bytes):
        r = await client.request(method, path, content=body, headers=JSON)
    else:
        r = await client.request(method, path, json=body)
    assert r.status_code == status, (case, r.text)
    assert await state(client) == before, case
    return r


def invalid(r: httpx.Response, where: str = "body") -> list[dict[str, Any]]:
    """Check Prefect's request-validation shape and return its ``exception_detail``."""
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"exception_message", "exception_detail", "request_body", "code"}
    assert body["code"] == "invalid_request"
    assert body["exception_message"] == "Invalid request received."
    details: list[dict[str, Any]] = body["exception_detail"]
    assert details
    for detail in details:
        assert {"type", "loc", "msg", "input"} <= set(detail)
        assert detail["loc"][0] == where
    return details


async def refused_422(
    client: httpx.AsyncClient, clock: FakeClock, method: str, path: str, cases: list[Case]
) -> None:
    """Each case answers Prefect's 422 naming exactly its error, echoes its body, changes nothing."""
    for case, body, kind, loc in cases:
        r = await refused(client, clock, 422, method, path, body, case=case)
        (detail,) = invalid(r)
        assert detail["type"] in kind.split("|"), (case, detail)
        if kind == "json_invalid":
            # Where the parse failed: FastAPI adds the offset, a direct pydantic parse does not.
            assert detail["loc"] in (loc, ["body"]), (case, detail)
        else:
            assert detail["loc"] == loc, (case, detail)
        echo = body.decode() if isinstance(body, bytes) and kind == "json_invalid" else body
        if not isinstance(body, bytes) or kind == "json_invalid":
            assert r.json()["request_body"] == echo, case


def error(r: httpx.Response, status: int) -> str:
    """Check an explicit error (``{"detail": ..., "code": ...}``, the code one of this status)
    and return its detail."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "code"}
    assert CODES[body["code"]][0] == status, body
    detail: str = body["detail"]
    return detail


def retry_after(r: httpx.Response) -> float:
    """The 423 answer: body ``Locked`` and a float Retry-After within the cap."""
    assert error(r, 423) == "Locked"
    header = r.headers["Retry-After"]
    seconds = float(header)
    assert "." in header or "e" in header  # a float string, as Prefect writes it, not an int
    assert 0 < seconds <= RETRY_AFTER_CAP
    return seconds


@contextlib.asynccontextmanager
async def serve(storage: Storage, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app built with other settings than the ``client`` fixture's."""
    app = create_app(settings, storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            yield http


async def lease_rows(storage: Storage) -> int:
    """Lease rows still stored (live, or expired and not reaped yet)."""
    row = await storage.backend.run(lambda tx: tx.one("SELECT COUNT(*) FROM leases"))
    assert row is not None
    count: int = row[0]
    return count


@pytest.fixture
async def populated(client: httpx.AsyncClient, clock: FakeClock) -> str:
    """``db`` (limit 3) with a leased slot and an unleased one; ``off`` inactive. Returns the lease."""
    await create(client, "db", 3)
    await create(client, "off", 1, active=False)
    lease_id = await take_lease(client, ["db"], holder=HOLDER)
    assert (await increment(client, ["db"])).status_code == 200
    clock.advance(5)
    return lease_id


# --- create: 201 / 409 / 422 ----------------------------------------------------------------------


async def test_create_answers_201_with_the_full_model(client: httpx.AsyncClient, clock: FakeClock) -> None:
    body = await create(client, "db", 10)
    assert uuid.UUID(body.pop("id"))
    assert body == {
        "created": "2027-01-15T08:00:00.000000Z",
        "updated": "2027-01-15T08:00:00.000000Z",
        "active": True,
        "name": "db",
        "limit": 10,
        "active_slots": 0,
        "slot_decay_per_second": 0.0,
        "denied_slots": 0,
        "avg_slot_occupancy_seconds": 2.0,
    }
    assert iso(clock.now) == body["created"]


async def test_create_takes_every_field(client: httpx.AsyncClient) -> None:
    body = await create(
        client, "busy", 5, active=False, active_slots=5, denied_slots=3, slot_decay_per_second=0.5
    )
    assert (body["active"], body["active_slots"], body["denied_slots"], body["slot_decay_per_second"]) == (
        False,
        5,
        3,
        0.5,
    )
    got = await read(client, "busy")
    assert set(got) == {
        "id",
        "created",
        "updated",
        "active",
        "name",
        "limit",
        "active_slots",
        "slot_decay_per_second",
    }
    assert (got["active"], got["active_slots"], got["limit"]) == (False, 5, 5)


async def test_create_accepts_any_name_prefect_accepts_and_reads_it_back(client: httpx.AsyncClient) -> None:
    for name in ["a b:c ü", "tag:etl", "deployment:x", "x" * 1024, "UPPER.lower-_~!", "日本"]:
        created = await create(client, name, 1)
        assert (await read(client, name))["id"] == created["id"], name


async def test_create_duplicate_name_is_409_and_keeps_the_first(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    first = await create(client, "db", 1)
    r = await refused(client, clock, 409, "POST", f"{V2}/", {"name": "db", "limit": 7})
    assert error(r, 409) == "A concurrency limit named 'db' already exists."
    assert (await read(client, "db"))["id"] == first["id"]


def _create(case: str, body: Any, kind: str, field: str | int | None) -> Case:
    return (case, body, kind, ["body"] if field is None else ["body", field])


BAD_CREATES: list[Case] = [
    _create("slash in name", {"name": "a/b", "limit": 1}, "string_pattern_mismatch", "name"),
    _create("percent in name", {"name": "a%b", "limit": 1}, "string_pattern_mismatch", "name"),
    _create("ampersand in name", {"name": "a&b", "limit": 1}, "string_pattern_mismatch", "name"),
    _create("> in name", {"name": "a>b", "limit": 1}, "string_pattern_mismatch", "name"),
    _create("< in name", {"name": "a<b", "limit": 1}, "string_pattern_mismatch", "name"),
    _create("empty name", {"name": "", "limit": 1}, "string_pattern_mismatch", "name"),
    _create("blank name", {"name": " ", "limit": 1}, "value_error", "name"),
    _create("whitespace name", {"name": "\t \n", "limit": 1}, "value_error", "name"),
    _create("name over 1024", {"name": "x" * 1025, "limit": 1}, "string_too_long", "name"),
    _create("uuid name", {"name": UUID_NAME, "limit": 1}, "value_error", "name"),
    _create("hex uuid name", {"name": UUID_NAME.replace("-", ""), "limit": 1}, "value_error", "name"),
    _create("NUL in name", {"name": "a\x00b", "limit": 1}, "value_error", "name"),
    _create("name not a string", {"name": 7, "limit": 1}, "string_type", "name"),
    _create("no name", {"limit": 1}, "missing", "name"),
    _create("no limit", {"name": "x"}, "missing", "limit"),
    _create("negative limit", {"name": "x", "limit": -1}, "greater_than_equal", "limit"),
    _create("float limit", {"name": "x", "limit": 1.5}, "int_from_float", "limit"),
    _create("string limit", {"name": "x", "limit": "many"}, "int_parsing", "limit"),
    _create("limit over int32", {"name": "x", "limit": 2**31}, "less_than_equal", "limit"),
    _create("bad active", {"name": "x", "limit": 1, "active": "maybe"}, "bool_parsing", "active"),
    _create(
        "negative active_slots",
        {"name": "x", "limit": 1, "active_slots": -1},
        "greater_than_equal",
        "active_slots",
    ),
    _create(
        "negative denied_slots",
        {"name": "x", "limit": 1, "denied_slots": -1},
        "greater_than_equal",
        "denied_slots",
    ),
    _create(
        "negative decay",
        {"name": "x", "limit": 1, "slot_decay_per_second": -0.5},
        "greater_than_equal",
        "slot_decay_per_second",
    ),
    _create("unknown key", {"name": "x", "limit": 1, "bogus": 1}, "extra_forbidden", "bogus"),
    _create(
        "avg is not accepted",
        {"name": "x", "limit": 1, "avg_slot_occupancy_seconds": 1.0},
        "extra_forbidden",
        "avg_slot_occupancy_seconds",
    ),
    _create(
        "NaN decay",
        b'{"name": "x", "limit": 1, "slot_decay_per_second": NaN}',
        "finite_number",
        "slot_decay_per_second",
    ),
    _create(
        "Infinity decay",
        b'{"name": "x", "limit": 1, "slot_decay_per_second": Infinity}',
        "finite_number",
        "slot_decay_per_second",
    ),
    _create(
        "-Infinity decay",
        b'{"name": "x", "limit": 1, "slot_decay_per_second": -Infinity}',
        "finite_number",
        "slot_decay_per_second",
    ),
    _create(
        "overflowing decay",
        b'{"name": "x", "limit": 1, "slot_decay_per_second": 1e999}',
        "finite_number",
        "slot_decay_per_second",
    ),
    _create("NaN limit", b'{"name": "x", "limit": NaN}', "finite_number", "limit"),
    _create("not JSON", b"not json", "json_invalid", 0),
    _create("truncated JSON", b'{"name": "x", "limit": 1', "json_invalid", 24),
    _create("array", b"[]", "model_attributes_type", None),
    _create("empty body", b"", "missing", None),
]


async def test_create_refuses_an_invalid_body_with_422(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "existing", 1)
    await refused_422(client, clock, "POST", f"{V2}/", BAD_CREATES)


# --- read: 200 / 404 ------------------------------------------------------------------------------


async def test_read_by_name_and_by_id_answers_the_same_limit(client: httpx.AsyncClient) -> None:
    created = await create(client, "db", 4)
    by_name = await read(client, "db")
    assert by_name == await read(client, created["id"])
    assert by_name == {
        k: v for k, v in created.items() if k not in ("denied_slots", "avg_slot_occupancy_seconds")
    }


async def test_read_of_an_unknown_limit_is_404(client: httpx.AsyncClient) -> None:
    await create(client, "db", 1)
    for key in ["missing", UUID_NAME, "tag:missing", "DB"]:
        r = await client.get(f"{V2}/{key}")
        assert r.status_code == 404, key
        assert r.json() == NOT_FOUND, key


async def test_read_reports_live_occupancy(client: httpx.AsyncClient) -> None:
    await create(client, "db", 5)
    await take_lease(client, ["db"], 2)
    assert (await increment(client, ["db"], 1)).status_code == 200
    assert await active(client, "db") == 3


# --- filter: 200 / 422 ----------------------------------------------------------------------------


async def test_filter_lists_limits_ordered_by_name_with_paging(client: httpx.AsyncClient) -> None:
    for name in ["c", "a", "B", "b"]:
        await create(client, name, 1)
    r = await client.post(f"{V2}/filter")
    assert r.status_code == 200
    assert [lim["name"] for lim in r.json()] == ["B", "a", "b", "c"]
    assert r.json()[0] == await read(client, "B")
    r = await client.post(f"{V2}/filter", json={"limit": 2, "offset": 1})
    assert [lim["name"] for lim in r.json()] == ["a", "b"]
    assert (await client.post(f"{V2}/filter", json={"offset": 4})).json() == []
    assert (await client.post(f"{V2}/filter", json={"limit": 0})).json() == []


async def test_filter_body_is_optional_and_200_is_the_largest_page(client: httpx.AsyncClient) -> None:
    await create(client, "db", 1)
    for kwargs in [{}, {"json": {}}, {"content": b"null", "headers": JSON}, {"json": {"limit": 200}}]:
        r = await client.post(f"{V2}/filter", **kwargs)
        assert r.status_code == 200, kwargs
        assert [lim["name"] for lim in r.json()] == ["db"], kwargs


async def test_filter_page_size_out_of_range_is_422_with_prefects_detail(client: httpx.AsyncClient) -> None:
    for limit, detail in [
        (201, "Invalid limit: must be less than or equal to 200."),
        (2**63, "Invalid limit: must be less than or equal to 200."),
        (-1, "Invalid limit: must be greater than or equal to 0."),
    ]:
        assert error(await client.post(f"{V2}/filter", json={"limit": limit}), 422) == detail


async def test_filter_page_size_bound_follows_the_setting(storage: Storage, tmp_path: Path) -> None:
    async with serve(storage, Settings(home=tmp_path, api_default_limit=2)) as client:
        for name in "abc":
            await create(client, name, 1)
        assert [lim["name"] for lim in (await client.post(f"{V2}/filter")).json()] == ["a", "b"]
        r = await client.post(f"{V2}/filter", json={"limit": 3})
        assert error(r, 422) == "Invalid limit: must be less than or equal to 2."


async def test_filter_invalid_body_is_422(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await refused_422(
        client,
        clock,
        "POST",
        f"{V2}/filter",
        [
            ("negative offset", {"offset": -1}, "greater_than_equal", ["body", "offset"]),
            ("offset over int32", {"offset": 2**31}, "less_than_equal", ["body", "offset"]),
            ("offset over int64", {"offset": 2**63}, "less_than_equal", ["body", "offset"]),  # was a 500
            ("float limit", {"limit": 1.5}, "int_from_float", ["body", "limit"]),
            ("string limit", {"limit": "all"}, "int_parsing", ["body", "limit"]),
            ("unknown key", {"bogus": 1}, "extra_forbidden", ["body", "bogus"]),
            ("array", b"[]", "model_attributes_type", ["body"]),
            ("not JSON", b"{{", "json_invalid", ["body", 1]),
        ],
    )


# --- update: 204 / 404 / 409 / 422 ----------------------------------------------------------------


async def test_update_with_an_empty_body_is_204_and_only_bumps_updated(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    before = await read(client, (await create(client, "db", 3))["id"])
    clock.advance(7)
    r = await client.patch(f"{V2}/db", json={})
    assert r.status_code == 204
    assert r.content == b""
    after = await read(client, "db")
    assert after["updated"] == iso(clock.now)
    assert {**after, "updated": before["updated"]} == before


async def test_update_writes_each_field_sent_by_name_or_id(client: httpx.AsyncClient) -> None:
    created = await create(client, "db", 3)
    assert (
        await client.patch(f"{V2}/db", json={"limit": 9, "slot_decay_per_second": 0.25})
    ).status_code == 204
    assert (
        await client.patch(f"{V2}/{created['id']}", json={"active": False, "active_slots": 4})
    ).status_code == 204
    assert (await client.patch(f"{V2}/db", json={"name": "renamed", "denied_slots": 2})).status_code == 204
    assert (await client.get(f"{V2}/db")).json() == NOT_FOUND
    got = await read(client, "renamed")
    assert got["id"] == created["id"]
    assert (got["limit"], got["slot_decay_per_second"], got["active"], got["active_slots"]) == (
        9,
        0.25,
        False,
        4,
    )


async def test_an_update_that_sets_a_field_to_null_is_422(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    # Deliberate difference: Prefect answers 409 (the column is NOT NULL); this server answered
    # 204 and changed nothing. Leaving the key out keeps the value; null says so.
    await create(client, "db", 3, active_slots=1)
    fields = ["name", "limit", "active", "active_slots", "denied_slots", "slot_decay_per_second"]
    cases = [_update(f"null {field}", {field: None}, "null_not_allowed", field) for field in fields]
    await refused_422(client, clock, "PATCH", f"{V2}/db", cases)
    r = await refused(client, clock, 422, "PATCH", f"{V2}/db", {"slot_decay_per_second": None, "limit": None})
    assert [(e["loc"], e["msg"]) for e in invalid(r)] == [
        (["body", "limit"], "Input should not be null: leave the field out to keep its value"),
        (
            ["body", "slot_decay_per_second"],
            "Input should not be null: leave the field out to keep its value",
        ),
    ]
    assert (await client.patch(f"{V2}/db", json={"limit": 4})).status_code == 204


async def test_active_slots_above_the_limit_is_422(client: httpx.AsyncClient, clock: FakeClock) -> None:
    # Deliberate difference: Prefect accepts it, at create and in a PATCH. Lowering the limit
    # below what is taken stays allowed (the holders keep their slots).
    r = await client.post(f"{V2}/", json={"name": "db", "limit": 5, "active_slots": 99})
    assert error(r, 422) == "active_slots cannot be set to 99: the limit is 5"
    assert r.json()["code"] == "active_slots_above_limit"
    assert (await client.post(f"{V2}/filter", json={})).json() == []
    await create(client, "db", 5, active_slots=5)
    r = await refused(client, clock, 422, "PATCH", f"{V2}/db", {"active_slots": 6})
    assert error(r, 422) == "active_slots cannot be set to 6: the limit is 5"
    r = await refused(client, clock, 422, "PATCH", f"{V2}/db", {"active_slots": 4, "limit": 3})
    assert error(r, 422) == "active_slots cannot be set to 4: the limit is 3"
    assert (await client.patch(f"{V2}/db", json={"active_slots": 6, "limit": 6})).status_code == 204
    assert (await client.patch(f"{V2}/db", json={"limit": 2})).status_code == 204
    assert (await read(client, "db"))["active_slots"] == 6


async def test_update_of_an_unknown_limit_is_404(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "db", 1)
    for key in ["missing", UUID_NAME]:
        r = await refused(client, clock, 404, "PATCH", f"{V2}/{key}", {"limit": 5}, case=key)
        assert r.json() == NOT_FOUND


async def test_update_renaming_onto_a_taken_name_is_409(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "a", 1)
    await create(client, "b", 1)
    r = await refused(client, clock, 409, "PATCH", f"{V2}/a", {"name": "b"})
    assert error(r, 409) == "A concurrency limit named 'b' already exists."


async def test_update_active_slots_below_what_leases_hold_is_409(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    # Deliberate difference: Prefect would overwrite the count and forget the holders.
    r = await refused(client, clock, 409, "PATCH", f"{V2}/db", {"active_slots": 0})
    assert error(r, 409) == (
        "active_slots cannot be set to 0: live leases hold 1 slot(s) of this limit. Release those "
        "leases first (list them with GET /api/v2/concurrency_limits/{name}/leases)."
    )
    assert (await client.patch(f"{V2}/db", json={"active_slots": 1})).status_code == 204
    assert await active(client, "db") == 1  # the leased slot; the unleased one was dropped
    assert (await client.patch(f"{V2}/db", json={"active_slots": 3})).status_code == 204
    assert await active(client, "db") == 3


def _update(case: str, body: Any, kind: str, field: str) -> Case:
    return (case, body, kind, ["body", field])


BAD_UPDATES: list[Case] = [
    _update("slash in name", {"name": "a/b"}, "string_pattern_mismatch", "name"),
    _update("empty name", {"name": ""}, "string_pattern_mismatch", "name"),
    _update("blank name", {"name": "  "}, "value_error", "name"),
    _update("uuid name", {"name": UUID_NAME}, "value_error", "name"),
    _update("NUL in name", {"name": "a\x00"}, "value_error", "name"),
    _update("negative limit", {"limit": -1}, "greater_than_equal", "limit"),
    _update("float limit", {"limit": 1.5}, "int_from_float", "limit"),
    _update("limit over int32", {"limit": 2**31}, "less_than_equal", "limit"),
    _update("negative active_slots", {"active_slots": -2}, "greater_than_equal", "active_slots"),
    _update("active_slots over int32", {"active_slots": 2**31}, "less_than_equal", "active_slots"),
    _update("negative decay", {"slot_decay_per_second": -1}, "greater_than_equal", "slot_decay_per_second"),
    _update("bad active", {"active": "sometimes"}, "bool_parsing", "active"),
    _update(
        "avg is not accepted",
        {"avg_slot_occupancy_seconds": 3.0},
        "extra_forbidden",
        "avg_slot_occupancy_seconds",
    ),
    _update("unknown key", {"limit": 5, "bogus": True}, "extra_forbidden", "bogus"),
    _update("NaN decay", b'{"slot_decay_per_second": NaN}', "finite_number", "slot_decay_per_second"),
    _update(
        "Infinity decay", b'{"slot_decay_per_second": Infinity}', "finite_number", "slot_decay_per_second"
    ),
    _update(
        "-Infinity decay", b'{"slot_decay_per_second": -Infinity}', "finite_number", "slot_decay_per_second"
    ),
    _update(
        "overflowing decay", b'{"slot_decay_per_second": 1e999}', "finite_number", "slot_decay_per_second"
    ),
]


async def test_update_invalid_body_is_422_and_changes_nothing(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    await refused_422(client, clock, "PATCH", f"{V2}/db", BAD_UPDATES)


# --- delete: 204 / 404 ----------------------------------------------------------------------------


async def test_delete_is_204_then_404(client: httpx.AsyncClient) -> None:
    created = await create(client, "db", 1)
    await create(client, "kept", 1)
    r = await client.delete(f"{V2}/{created['id']}")
    assert r.status_code == 204
    assert r.content == b""
    assert (await client.get(f"{V2}/db")).json() == NOT_FOUND
    r = await client.delete(f"{V2}/db")
    assert r.status_code == 404
    assert r.json() == NOT_FOUND
    assert [lim["name"] for lim in (await client.post(f"{V2}/filter")).json()] == ["kept"]


async def test_delete_of_a_held_limit_frees_its_name_and_its_leases_still_release(
    client: httpx.AsyncClient, populated: str
) -> None:
    assert (await client.delete(f"{V2}/db")).status_code == 204
    assert (await release(client, populated)).status_code == 204
    recreated = await create(client, "db", 3)
    assert recreated["active_slots"] == 0
    assert await leases(client, "db") == []


# --- increment: 200 / 422 / 423 -------------------------------------------------------------------


async def test_increment_answers_the_found_limits_with_fencing_tokens(client: httpx.AsyncClient) -> None:
    a = await create(client, "a", 5)
    b = await create(client, "b", 5)
    r = await increment(client, ["b", "missing", "a"], 2)
    assert r.status_code == 200
    assert r.json() == [
        {"id": b["id"], "name": "b", "limit": 5, "fencing_token": 1},
        {"id": a["id"], "name": "a", "limit": 5, "fencing_token": 1},
    ]
    assert (await active(client, "a"), await active(client, "b")) == (2, 2)
    r = await increment(client, ["a"], 1)
    assert r.json()[0]["fencing_token"] == 2  # one more grant on "a", a higher token
    assert await active(client, "a") == 3


async def test_increment_of_unknown_names_is_200_with_nothing(client: httpx.AsyncClient) -> None:
    for names in [[], ["missing"], ["x", "y"]]:
        r = await increment(client, names, 1)
        assert r.status_code == 200, names
        assert r.json() == [], names


async def test_increment_ignores_create_if_missing(client: httpx.AsyncClient) -> None:
    r = await increment(client, ["ghost"], 1, create_if_missing=True)
    assert r.status_code == 200
    assert r.json() == []
    assert (await client.get(f"{V2}/ghost")).status_code == 404


async def test_increment_of_a_repeated_name_takes_slots_once(client: httpx.AsyncClient) -> None:
    await create(client, "a", 5)
    r = await increment(client, ["a", "a"], 2)
    assert [lim["name"] for lim in r.json()] == ["a"]
    assert await active(client, "a") == 2


async def test_increment_lists_an_inactive_limit_but_never_counts_it(client: httpx.AsyncClient) -> None:
    await create(client, "on", 2)
    await create(client, "off", 1, active=False)
    # Even slots above the inactive limit: inactive limits take no part in the checks.
    r = await increment(client, ["on", "off"], 2)
    assert r.status_code == 200
    assert [lim["name"] for lim in r.json()] == ["on", "off"]
    assert (await active(client, "on"), await active(client, "off")) == (2, 0)


async def test_increment_on_a_full_limit_is_423_with_a_float_retry_after(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 1)
    assert (await increment(client, ["db"])).status_code == 200
    r = await refused(client, clock, 423, "POST", f"{V2}/increment", {"names": ["db"], "slots": 1})
    # Limit 1, average hold 2 s (the default): what is left of a hold on average is 1 s (Prefect
    # says the whole 2 s), jittered by [0.75, 1.3].
    assert 1.0 * 0.75 <= retry_after(r) <= 1.0 * 1.3


async def test_increment_of_more_slots_than_the_limit_is_422(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    r = await refused(client, clock, 422, "POST", f"{V2}/increment", {"names": ["db"], "slots": 4})
    assert r.json() == SLOTS_OVER_LIMIT


async def test_rate_limit_mode_needs_decay_on_every_active_limit(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "x", 5)
    await create(client, "decays", 5, slot_decay_per_second=1.0)
    await create(client, "y", 5)
    await create(client, "off", 5, active=False)
    body = {"names": ["x", "decays", "y", "off"], "slots": 1, "mode": "rate_limit"}
    r = await refused(client, clock, 422, "POST", f"{V2}/increment", body)
    assert error(r, 422) == (
        "Only concurrency limits with slot decay can be used for rate limiting. "
        "The following limits do not have a decay configured: 'x,y'"
    )


async def test_slots_over_the_limit_is_checked_before_the_decay_rule(client: httpx.AsyncClient) -> None:
    await create(client, "x", 1)
    r = await increment(client, ["x"], 2, mode="rate_limit")
    assert r.json() == SLOTS_OVER_LIMIT


def _slots(case: str, body: dict[str, Any], kind: str, *loc: str | int) -> Case:
    return (case, body, kind, ["body", *loc])


BAD_SLOT_BODIES: list[Case] = [
    _slots("slots 0", {"names": ["db"], "slots": 0}, "greater_than", "slots"),
    _slots("negative slots", {"names": ["db"], "slots": -1}, "greater_than", "slots"),
    _slots("float slots", {"names": ["db"], "slots": 1.5}, "int_from_float", "slots"),
    _slots("slots over int32", {"names": ["db"], "slots": 2**31}, "less_than_equal", "slots"),
    _slots("no slots", {"names": ["db"]}, "missing", "slots"),
    _slots("no names", {"slots": 1}, "missing", "names"),
    _slots("bare name", {"names": "db", "slots": 1}, "list_type", "names"),
    _slots("int name", {"names": [1], "slots": 1}, "string_type", "names", 0),
    _slots("NUL in a name", {"names": ["db", "a\x00"], "slots": 1}, "value_error", "names", 1),
    _slots("unknown key", {"names": ["db"], "slots": 1, "bogus": 1}, "extra_forbidden", "bogus"),
]


async def test_slot_endpoints_refuse_an_invalid_body_with_422(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    for endpoint in ["increment", "increment-with-lease", "decrement"]:
        cases = [(f"{endpoint}: {case}", body, kind, loc) for case, body, kind, loc in BAD_SLOT_BODIES]
        await refused_422(client, clock, "POST", f"{V2}/{endpoint}", cases)


async def test_an_unknown_mode_is_422(client: httpx.AsyncClient, clock: FakeClock, populated: str) -> None:
    for endpoint in ["increment", "increment-with-lease"]:
        body = {"names": ["db"], "slots": 1, "mode": "greedy"}
        r = await refused(client, clock, 422, "POST", f"{V2}/{endpoint}", body, case=endpoint)
        (detail,) = invalid(r)
        assert (detail["type"], detail["loc"]) == ("enum", ["body", "mode"])
        assert detail["msg"] == "Input should be 'concurrency' or 'rate_limit'"


# --- increment-with-lease: 200 / 422 / 423 --------------------------------------------------------


async def test_increment_with_lease_answers_a_lease_and_the_limits(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    db = await create(client, "db", 3)
    r = await with_lease(client, ["db", "missing"], 2, holder=HOLDER, lease_duration=120)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"lease_id", "limits"}  # the holder is never echoed
    assert uuid.UUID(body["lease_id"])
    assert body["limits"] == [{"id": db["id"], "name": "db", "limit": 3, "fencing_token": 1}]
    assert await active(client, "db") == 2
    assert await leases(client, "db") == [
        {
            "lease_id": body["lease_id"],
            "holder": HOLDER,
            "slots": 2,
            "created": iso(clock.now),
            "expires": iso(clock.now + 120),
            "fencing_token": 1,
        }
    ]


async def test_increment_with_lease_defaults_to_300_seconds_and_no_holder(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 1)
    lease_id = await take_lease(client, ["db"], holder=None)
    (listed,) = await leases(client, "db")
    assert (listed["lease_id"], listed["holder"], listed["expires"]) == (lease_id, None, iso(clock.now + 300))


async def test_increment_with_lease_on_no_limit_answers_a_lease_id_that_is_not_stored(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    for names in [[], ["missing"]]:
        r = await with_lease(client, names, 1)
        assert r.status_code == 200
        assert r.json()["limits"] == []
        lease_id = r.json()["lease_id"]
        assert uuid.UUID(lease_id)
        assert await lease_rows(storage) == 0
        assert (await renew(client, lease_id)).json() == LEASE_GONE
        assert (await release(client, lease_id)).status_code == 204


async def test_increment_with_lease_lists_and_leases_an_inactive_limit_without_counting(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "off", 1, active=False)
    r = await with_lease(client, ["off"], 5)
    assert r.status_code == 200
    assert [lim["name"] for lim in r.json()["limits"]] == ["off"]
    assert await active(client, "off") == 0
    assert [(x["lease_id"], x["slots"]) for x in await leases(client, "off")] == [(r.json()["lease_id"], 0)]


async def test_increment_with_lease_on_a_full_limit_is_423_and_creates_no_lease(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    assert (await increment(client, ["db"])).status_code == 200  # now 3 of 3
    retry_after(
        await refused(client, clock, 423, "POST", f"{V2}/increment-with-lease", {"names": ["db"], "slots": 1})
    )


async def test_increment_with_lease_refuses_what_increment_refuses(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    r = await refused(client, clock, 422, "POST", f"{V2}/increment-with-lease", {"names": ["db"], "slots": 9})
    assert r.json() == SLOTS_OVER_LIMIT
    body = {"names": ["db"], "slots": 1, "mode": "rate_limit"}
    r = await refused(client, clock, 422, "POST", f"{V2}/increment-with-lease", body)
    assert error(r, 422).endswith("The following limits do not have a decay configured: 'db'")


async def test_lease_duration_bounds_are_inclusive(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "db", 1)
    for duration in [60, 60.0, 3600.5, 86400]:
        lease_id = await take_lease(client, ["db"], lease_duration=duration)
        assert (await leases(client, "db"))[0]["expires"] == iso(clock.now + duration), duration
        assert (await release(client, lease_id)).status_code == 204


async def test_lease_duration_out_of_range_is_422_with_pydantics_detail(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    for duration, kind, msg, ctx in [
        (59, "greater_than_equal", "Input should be greater than or equal to 60", {"ge": 60.0}),
        (59.999, "greater_than_equal", "Input should be greater than or equal to 60", {"ge": 60.0}),
        (86401, "less_than_equal", "Input should be less than or equal to 86400", {"le": 86400.0}),
    ]:
        body = {"names": ["db"], "slots": 1, "lease_duration": duration}
        r = await refused(client, clock, 422, "POST", f"{V2}/increment-with-lease", body, case=str(duration))
        assert invalid(r) == [
            {"type": kind, "loc": ["body", "lease_duration"], "msg": msg, "input": duration, "ctx": ctx}
        ]
        assert r.json()["request_body"] == body


def _holder(case: str, holder: Any, kind: str, *loc: str) -> Case:
    return (case, {"names": ["db"], "slots": 1, "holder": holder}, kind, ["body", "holder", *loc])


BAD_HOLDERS: list[Case] = [
    _holder("bad type", {"type": "user", "id": HOLDER["id"]}, "literal_error", "type"),
    _holder("extra key", {**HOLDER, "name": "me"}, "extra_forbidden", "name"),
    _holder("missing id", {"type": "flow_run"}, "missing", "id"),
    _holder("missing type", {"id": HOLDER["id"]}, "missing", "type"),
    _holder("id not a uuid", {"type": "flow_run", "id": "nope"}, "uuid_parsing", "id"),
    _holder("not an object", "task_run", "model_attributes_type|model_type"),
]


async def test_an_invalid_holder_is_422(client: httpx.AsyncClient, clock: FakeClock, populated: str) -> None:
    await refused_422(client, clock, "POST", f"{V2}/increment-with-lease", BAD_HOLDERS)


async def test_every_holder_type_prefect_sends_is_accepted(client: httpx.AsyncClient) -> None:
    await create(client, "db", 1)
    for kind in ["flow_run", "task_run", "deployment"]:
        lease_id = await take_lease(client, ["db"], holder={"type": kind, "id": HOLDER["id"]})
        assert (await leases(client, "db"))[0]["holder"] == {"type": kind, "id": HOLDER["id"]}
        assert (await release(client, lease_id)).status_code == 204


async def test_increment_with_lease_refuses_create_if_missing(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    # Prefect's body is /increment's minus create_if_missing: it is an unknown key here.
    body = {"names": ["db"], "slots": 1, "create_if_missing": True}
    case = ("create_if_missing", body, "extra_forbidden", ["body", "create_if_missing"])
    await refused_422(client, clock, "POST", f"{V2}/increment-with-lease", [case])


# --- decrement: 200 -------------------------------------------------------------------------------


async def test_decrement_frees_unleased_slots_clamped_at_zero(client: httpx.AsyncClient) -> None:
    db = await create(client, "db", 5)
    assert (await increment(client, ["db"], 2)).status_code == 200
    r = await client.post(f"{V2}/decrement", json={"names": ["db", "missing"], "slots": 5})
    assert r.status_code == 200
    assert r.json() == [{"id": db["id"], "name": "db", "limit": 5}]  # no fencing token on release
    assert await active(client, "db") == 0
    r = await client.post(f"{V2}/decrement", json={"names": ["db"], "slots": 1, "occupancy_seconds": 3.5})
    assert r.status_code == 200
    assert await active(client, "db") == 0


async def test_decrement_of_unknown_names_is_200_with_nothing(client: httpx.AsyncClient) -> None:
    for names in [[], ["missing"]]:
        r = await client.post(f"{V2}/decrement", json={"names": names, "slots": 1})
        assert r.status_code == 200, names
        assert r.json() == [], names


async def test_decrement_lists_an_inactive_limit_but_never_counts_it(client: httpx.AsyncClient) -> None:
    await create(client, "off", 5, active=False, active_slots=3)
    r = await client.post(f"{V2}/decrement", json={"names": ["off"], "slots": 2})
    assert [lim["name"] for lim in r.json()] == ["off"]
    assert await active(client, "off") == 3


async def test_decrement_never_frees_slots_held_by_a_lease(client: httpx.AsyncClient, populated: str) -> None:
    r = await client.post(f"{V2}/decrement", json={"names": ["db"], "slots": 3})
    assert r.status_code == 200
    assert await active(client, "db") == 1  # only the unleased slot went
    assert [x["lease_id"] for x in await leases(client, "db")] == [populated]


async def test_decrement_occupancy_must_be_positive(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    cases: list[Case] = [
        (
            f"occupancy {value}",
            {"names": ["db"], "slots": 1, "occupancy_seconds": value},
            "greater_than",
            ["body", "occupancy_seconds"],
        )
        for value in (0, -1.0)
    ]
    await refused_422(client, clock, "POST", f"{V2}/decrement", cases)


# --- decrement-with-lease: 204 --------------------------------------------------------------------


async def test_decrement_with_lease_frees_every_limit_and_is_204_twice(client: httpx.AsyncClient) -> None:
    await create(client, "a", 2)
    await create(client, "b", 2)
    lease_id = await take_lease(client, ["a", "b"], 2)
    assert (await active(client, "a"), await active(client, "b")) == (2, 2)
    for _ in range(2):
        r = await release(client, lease_id)
        assert r.status_code == 204
        assert r.content == b""
    assert (await active(client, "a"), await active(client, "b")) == (0, 0)
    assert await leases(client, "a") == []


async def test_decrement_with_an_unknown_lease_is_204_and_a_no_op(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    r = await refused(
        client, clock, 204, "POST", f"{V2}/decrement-with-lease", {"lease_id": str(uuid.uuid4())}
    )
    assert r.content == b""


async def test_decrement_with_lease_invalid_body_is_422(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    await refused_422(
        client,
        clock,
        "POST",
        f"{V2}/decrement-with-lease",
        [
            ("no lease_id", {}, "missing", ["body", "lease_id"]),
            ("lease_id not a uuid", {"lease_id": "nope"}, "uuid_parsing", ["body", "lease_id"]),
            ("null lease_id", {"lease_id": None}, "uuid_type", ["body", "lease_id"]),
            ("unknown key", {"lease_id": populated, "slots": 1}, "extra_forbidden", ["body", "slots"]),
        ],
    )


# --- renew: 204 / 410 / 422 -----------------------------------------------------------------------


async def test_renew_sets_the_expiry_to_now_plus_the_duration(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 1)
    lease_id = await take_lease(client, ["db"], lease_duration=600)
    clock.advance(100)
    r = await renew(client, lease_id, lease_duration=60)
    assert r.status_code == 204
    assert r.content == b""
    # now + 60, not the old expiry + 60 (so it may even shorten the lease)
    assert (await leases(client, "db"))[0]["expires"] == iso(clock.now + 60)


async def test_renew_without_a_body_renews_for_300_seconds(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 1)
    lease_id = await take_lease(client, ["db"], lease_duration=60)
    clock.advance(30)
    r = await client.post(f"{V2}/leases/{lease_id}/renew")
    assert r.status_code == 204
    assert (await leases(client, "db"))[0]["expires"] == iso(clock.now + 300)


async def test_renew_accepts_the_lease_id_in_any_uuid_spelling(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 1)
    lease_id = await take_lease(client, ["db"])
    assert (await renew(client, lease_id.upper(), lease_duration=100)).status_code == 204
    assert (await renew(client, lease_id.replace("-", ""), lease_duration=200)).status_code == 204
    assert (await leases(client, "db"))[0]["expires"] == iso(clock.now + 200)


async def test_renew_of_an_unknown_or_released_lease_is_410(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    r = await refused(client, clock, 410, "POST", f"{V2}/leases/{uuid.uuid4()}/renew")
    assert r.json() == LEASE_GONE
    assert (await release(client, populated)).status_code == 204
    r = await refused(client, clock, 410, "POST", f"{V2}/leases/{populated}/renew", {"lease_duration": 60})
    assert r.json() == LEASE_GONE


async def test_renew_past_the_expiry_is_410_even_before_the_reaper_ran(
    storage: Storage, clock: FakeClock, tmp_path: Path
) -> None:
    # Deliberate difference: Prefect renews an expired lease until its repossessor revoked it.
    # The reaper here waits a minute between passes, so the expired row is certainly still stored.
    async with serve(storage, Settings(home=tmp_path, reaper_interval_seconds=60)) as client:
        await create(client, "db", 1)
        lease_id = await take_lease(client, ["db"], lease_duration=60)
        clock.advance(60)
        r = await renew(client, lease_id, lease_duration=60)
        assert r.status_code == 410
        assert r.json() == LEASE_GONE
        assert await lease_rows(storage) == 1  # not reaped yet, and gone all the same
        assert await active(client, "db") == 0
        assert await leases(client, "db") == []
        assert (await increment(client, ["db"])).status_code == 200


async def test_renew_invalid_body_is_422_and_keeps_the_expiry(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    await refused_422(
        client,
        clock,
        "POST",
        f"{V2}/leases/{populated}/renew",
        [
            ("duration 59", {"lease_duration": 59}, "greater_than_equal", ["body", "lease_duration"]),
            ("duration 86401", {"lease_duration": 86401}, "less_than_equal", ["body", "lease_duration"]),
            ("string duration", {"lease_duration": "long"}, "float_parsing", ["body", "lease_duration"]),
            ("Infinity", b'{"lease_duration": Infinity}', "finite_number", ["body", "lease_duration"]),
            ("NaN", b'{"lease_duration": NaN}', "finite_number", ["body", "lease_duration"]),
            ("unknown key", {"lease_duration": 100, "extra": 1}, "extra_forbidden", ["body", "extra"]),
            ("not JSON", b"sixty", "json_invalid", ["body", 0]),
        ],
    )


async def test_renew_with_a_lease_id_that_is_not_a_uuid_is_422(
    client: httpx.AsyncClient, clock: FakeClock, populated: str
) -> None:
    for lease_id in ["not-a-uuid", "12345", "db"]:
        r = await refused(client, clock, 422, "POST", f"{V2}/leases/{lease_id}/renew", case=lease_id)
        assert [(d["type"], d["loc"]) for d in invalid(r, where="path")] == [
            ("uuid_parsing", ["path", "lease_id"])
        ]


# --- leases listing (slotkeeper extension) --------------------------------------------------------


async def test_leases_lists_live_leases_oldest_first(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "a", 5)
    await create(client, "b", 5)
    first = await take_lease(client, ["a", "b"], 2, holder=HOLDER, lease_duration=60)
    start = clock.now
    clock.advance(10)
    assert (await increment(client, ["a"])).status_code == 200  # a's token goes to 2, b's stays 1
    second = await take_lease(client, ["a"], 1)
    listed = await leases(client, "a")
    assert listed == [
        {
            "lease_id": first,
            "holder": HOLDER,
            "slots": 2,
            "created": iso(start),
            "expires": iso(start + 60),
            "fencing_token": 1,
        },
        {
            "lease_id": second,
            "holder": None,
            "slots": 1,
            "created": iso(clock.now),
            "expires": iso(clock.now + 300),
            "fencing_token": 3,
        },
    ]
    for lease in listed:
        assert ISO_Z.match(lease["created"])
        assert ISO_Z.match(lease["expires"])
    assert [x["lease_id"] for x in await leases(client, "b")] == [first]
    # Expired and released leases are not live any more.
    clock.advance(51)
    assert [x["lease_id"] for x in await leases(client, "a")] == [second]
    assert (await release(client, second)).status_code == 204
    assert await leases(client, (await read(client, "a"))["id"]) == []


async def test_leases_of_an_unknown_limit_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{V2}/missing/leases")
    assert r.status_code == 404
    assert r.json() == NOT_FOUND


# --- scenarios ------------------------------------------------------------------------------------


async def test_multi_limit_acquisition_is_all_or_nothing(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "roomy", 5)
    await create(client, "tight", 1)
    blocker = await take_lease(client, ["tight"])
    both = {"names": ["roomy", "tight"], "slots": 1}
    retry_after(await refused(client, clock, 423, "POST", f"{V2}/increment", both))
    retry_after(await refused(client, clock, 423, "POST", f"{V2}/increment-with-lease", both))
    assert await active(client, "roomy") == 0
    assert (await release(client, blocker)).status_code == 204
    lease_id = await take_lease(client, ["roomy", "tight"])
    assert (await active(client, "roomy"), await active(client, "tight")) == (1, 1)
    assert (await release(client, lease_id)).status_code == 204
    assert (await active(client, "roomy"), await active(client, "tight")) == (0, 0)


async def test_a_limit_lowered_below_its_held_slots_refuses_until_enough_are_freed(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 3)
    held = [await take_lease(client, ["db"]) for _ in range(3)]
    assert (await client.patch(f"{V2}/db", json={"limit": 1})).status_code == 204
    assert await active(client, "db") == 3  # allowed, as in Prefect: the holders keep their slots
    for lease_id in held:
        retry_after(
            await refused(client, clock, 423, "POST", f"{V2}/increment", {"names": ["db"], "slots": 1})
        )
        assert (await release(client, lease_id)).status_code == 204
    assert await active(client, "db") == 0
    assert (await increment(client, ["db"])).status_code == 200
    retry_after(await increment(client, ["db"]))


async def test_a_limit_set_to_zero_while_held_can_still_be_released(client: httpx.AsyncClient) -> None:
    # Prefect fails this release (division by zero in its occupancy average) and keeps the lease.
    await create(client, "db", 2)
    lease_id = await take_lease(client, ["db"])
    assert (await increment(client, ["db"])).status_code == 200
    assert (await client.patch(f"{V2}/db", json={"limit": 0})).status_code == 204
    assert (await increment(client, ["db"])).json() == SLOTS_OVER_LIMIT
    assert (await release(client, lease_id)).status_code == 204
    r = await client.post(f"{V2}/decrement", json={"names": ["db"], "slots": 1, "occupancy_seconds": 4.0})
    assert r.status_code == 200
    assert await active(client, "db") == 0
    assert await leases(client, "db") == []


async def test_an_expired_lease_frees_its_slots_and_the_reaper_reclaims_it(
    client: httpx.AsyncClient, clock: FakeClock, storage: Storage
) -> None:
    await create(client, "db", 2)
    lease_id = await take_lease(client, ["db"], 2, lease_duration=60)
    clock.advance(59.5)
    retry_after(await increment(client, ["db"]))
    clock.advance(1)
    r = await renew(client, lease_id)
    assert r.status_code == 410
    assert r.json() == LEASE_GONE
    assert await active(client, "db") == 0
    # The app's reaper (every 0.05 s here) deletes the expired lease row.
    for _ in range(400):
        if await lease_rows(storage) == 0:
            break
        await asyncio.sleep(0.005)
    assert await lease_rows(storage) == 0
    assert (await release(client, lease_id)).status_code == 204
    assert (await increment(client, ["db"], 2)).status_code == 200


async def test_a_lease_renewed_in_time_is_never_reclaimed(
    client: httpx.AsyncClient, clock: FakeClock, storage: Storage
) -> None:
    await create(client, "db", 1)
    lease_id = await take_lease(client, ["db"], lease_duration=60)
    for _ in range(5):
        clock.advance(50)
        assert (await renew(client, lease_id, lease_duration=60)).status_code == 204
    assert await storage.reap_expired() == 0
    assert await active(client, "db") == 1
    retry_after(await increment(client, ["db"]))
    assert [x["lease_id"] for x in await leases(client, "db")] == [lease_id]


async def test_rate_limit_slots_come_back_by_decay(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "api", 2, slot_decay_per_second=1.0)
    assert (await increment(client, ["api"], 2, mode="rate_limit")).status_code == 200
    # The wait is exact here: one slot decays in 1 s (then jittered by [0.75, 1.3]).
    assert retry_after(await increment(client, ["api"], mode="rate_limit")) <= 1.3
    clock.advance(0.5)
    assert retry_after(await increment(client, ["api"], mode="rate_limit")) <= 0.65
    clock.advance(0.5)
    assert await active(client, "api") == 1
    clock.advance(1)
    assert await active(client, "api") == 0
    assert (await increment(client, ["api"], 2, mode="rate_limit")).status_code == 200


async def test_decay_keeps_fractions_across_writes(client: httpx.AsyncClient, clock: FakeClock) -> None:
    # Deliberate difference: Prefect drops the fraction on every write, so 0.6 s + 0.6 s decays nothing.
    await create(client, "api", 3, slot_decay_per_second=1.0)
    assert (await increment(client, ["api"], 2, mode="rate_limit")).status_code == 200
    clock.advance(0.6)
    assert (await increment(client, ["api"], 1, mode="rate_limit")).status_code == 200
    clock.advance(0.6)
    assert await active(client, "api") == 2
    assert (await increment(client, ["api"], 1, mode="rate_limit")).status_code == 200


async def test_patch_keeps_accrued_decay(client: httpx.AsyncClient, clock: FakeClock) -> None:
    # Prefect's example: 10 slots at 0.1/s read 7 after 30.5 s, and a PATCH brings back 10.
    await create(client, "db", 10, active_slots=10, slot_decay_per_second=0.1)
    clock.advance(30.5)
    assert await active(client, "db") == 7
    assert (await client.patch(f"{V2}/db", json={"name": "db2"})).status_code == 204
    assert await active(client, "db2") == 7
    clock.advance(9.6)  # 40.1 s in all: 4.01 slots decayed, whatever the PATCH did
    assert await active(client, "db2") == 6
    r = await client.post(f"{V2}/filter")
    assert [(lim["name"], lim["active_slots"]) for lim in r.json()] == [("db2", 6)]


async def test_leased_slots_do_not_decay(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "db", 2, slot_decay_per_second=1.0)
    lease_id = await take_lease(client, ["db"], 2)
    clock.advance(200)
    assert await active(client, "db") == 2
    retry_after(await increment(client, ["db"]))
    assert (await release(client, lease_id)).status_code == 204
    assert await active(client, "db") == 0


async def test_a_database_error_is_503_never_500(
    client: httpx.AsyncClient, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create(client, "db", 1)
    failure: Exception = (
        sqlite3.OperationalError("database is locked")
        if storage.backend.name == "sqlite"
        else psycopg.OperationalError("server closed the connection unexpectedly")
    )

    async def unavailable(op: Any) -> Any:
        raise failure

    monkeypatch.setattr(storage.backend, "run", unavailable)
    for method, path, body in [
        ("GET", f"{V2}/db", None),
        ("POST", f"{V2}/", {"name": "new", "limit": 1}),
        ("POST", f"{V2}/increment", {"names": ["db"], "slots": 1}),
        ("POST", f"{V2}/leases/{uuid.uuid4()}/renew", None),
    ]:
        r = await client.request(method, path, json=body)
        assert error(r, 503) == "The database is unavailable; try again.", path
        assert r.headers["Retry-After"] == "1"
    monkeypatch.undo()
    assert [lim["name"] for lim in (await client.post(f"{V2}/filter")).json()] == ["db"]


# --- request limits and unusual input -------------------------------------------------------------


@pytest.fixture
async def small_client(storage: Storage, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app that takes request bodies of at most 1024 bytes."""
    async with serve(
        storage, Settings(home=tmp_path, reaper_interval_seconds=0.05, max_body_bytes=1024)
    ) as http:
        yield http


async def test_a_body_over_the_cap_is_413(small_client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(small_client, "db", 1)
    body = {"name": "x" * 1000, "limit": 1, "slot_decay_per_second": 0.5}
    assert (await refused(small_client, clock, 413, "POST", f"{V2}/", body)).json() == TOO_LARGE
    body = {"names": ["db"] * 300, "slots": 1}
    assert (await refused(small_client, clock, 413, "POST", f"{V2}/increment", body)).json() == TOO_LARGE
    assert (await increment(small_client, ["db"] * 100)).status_code == 200


async def test_a_streamed_body_over_the_cap_is_413(small_client: httpx.AsyncClient, clock: FakeClock) -> None:
    # No content-length: the cap is enforced as the body arrives (this was a 400 from FastAPI).
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(8):
            yield b"y" * 200
        yield b'", "limit": 1}'

    before = await state(small_client)
    r = await small_client.post(f"{V2}/", content=chunks(), headers=JSON)
    assert r.status_code == 413
    assert r.json() == TOO_LARGE
    assert await state(small_client) == before


async def test_a_name_with_nul_is_refused_in_the_path(client: httpx.AsyncClient) -> None:
    # PostgreSQL text cannot hold NUL: this was a 500 there (and a 404 on SQLite).
    await create(client, "db", 1)
    for method, path in [("GET", "db%00x"), ("DELETE", "db%00x"), ("GET", "db%00x/leases")]:
        r = await client.request(method, f"{V2}/{path}")
        (detail,) = invalid(r, where="path")
        assert (detail["type"], detail["loc"]) == ("value_error", ["path", "id_or_name"]), path
        assert detail["msg"] == "Value error, a limit name must not contain the NUL character"
    r = await client.patch(f"{V2}/db%00x", json={"limit": 2})
    assert invalid(r, where="path")[0]["loc"] == ["path", "id_or_name"]
    assert (await read(client, "db"))["limit"] == 1


async def test_a_lone_surrogate_is_refused_with_422(client: httpx.AsyncClient, clock: FakeClock) -> None:
    # Was a 500: PostgreSQL cannot store it, and orjson could not even echo it in the 422.
    # Refused as the field's value, or (by a strict JSON parser) as invalid JSON.
    for path, raw, loc in [
        (f"{V2}/", b'{"name": "x\\ud800", "limit": 1}', ["body", "name"]),
        (f"{V2}/increment", b'{"names": ["x\\udfff"], "slots": 1}', ["body", "names", 0]),
        (f"{V2}/decrement", b'{"names": ["\\ud800"], "slots": 1}', ["body", "names", 0]),
        (f"{V2}/increment-with-lease", b'{"names": ["\\ud800"], "slots": 1}', ["body", "names", 0]),
    ]:
        r = await refused(client, clock, 422, "POST", path, raw, case=path)
        (detail,) = invalid(r)
        assert (detail["type"], detail["loc"]) in [
            ("string_unicode", loc),
            ("value_error", loc),
            ("json_invalid", ["body"]),
        ], (path, detail)


async def test_an_int_beyond_64_bits_is_422(client: httpx.AsyncClient, clock: FakeClock) -> None:
    # Was a 500: the 422 echoes the input, and orjson refuses ints beyond 64 bits.
    await create(client, "db", 1)
    for path, raw, loc in [
        (f"{V2}/", b'{"name": "x", "limit": 100000000000000000000000}', ["body", "limit"]),
        (f"{V2}/increment", b'{"names": ["db"], "slots": 18446744073709551616}', ["body", "slots"]),
        (f"{V2}/filter", b'{"offset": 99999999999999999999999999}', ["body", "offset"]),
    ]:
        r = await refused(client, clock, 422, "POST", path, raw, case=path)
        (detail,) = invalid(r)
        assert (detail["type"], detail["loc"]) == ("less_than_equal", loc), path
        assert detail["input"] == int(raw.split(b":")[-1].strip(b"} ")), path


async def test_retry_after_never_exceeds_the_cap(client: httpx.AsyncClient) -> None:
    # 1 slot per 1000 s: the exact wait (1000 s) is capped, whatever the jitter draws.
    await create(client, "slow", 1, slot_decay_per_second=0.001)
    assert (await increment(client, ["slow"], mode="rate_limit")).status_code == 200
    hints = [
        float((await increment(client, ["slow"], mode="rate_limit")).headers["Retry-After"])
        for _ in range(20)
    ]
    assert all(hint <= RETRY_AFTER_CAP for hint in hints), hints
