"""Hostile input (issue 11): each case here once hurt the server (a 500, a poisoned limit, a
frozen loop, a flooded log). Each test sends what broke it and asserts the 4xx with its code, or
the harmless outcome, on both backends."""

# ruff: noqa: F811 (the fixtures ``api`` and ``served`` are imported from the tests that define them)

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from slotkeeper import domain
from slotkeeper.api.app import create_app
from slotkeeper.events.models import EventRecord, iso
from slotkeeper.models import LimitSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock, take
from tests.test_api_events import VALID_INNER, _token, api, post, stored, wire  # noqa: F401
from tests.test_domain import NOW, make_limit
from tests.test_websockets import Served, authenticate, closed_with, served  # noqa: F401

V2 = "/v2/concurrency_limits"
V1 = "/concurrency_limits"

#: The 7 hot POST routes, each with a body that would be valid as JSON.
HOT_POSTS = [
    (f"{V2}/increment", {"names": ["p"], "slots": 1}),
    (f"{V2}/increment-with-lease", {"names": ["p"], "slots": 1}),
    (f"{V2}/decrement", {"names": ["p"], "slots": 1}),
    (f"{V2}/decrement-with-lease", {"lease_id": "0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e"}),
    (f"{V2}/leases/0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e/renew", {"lease_duration": 60}),
    (f"{V1}/increment", {"names": ["p"], "slots": 1, "mode": "concurrency"}),
    (f"{V1}/decrement", {"names": ["p"], "slots": 1}),
]


# --- defect 7: a body that is not UTF-8 ----------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), HOT_POSTS)
async def test_a_body_that_is_not_utf8_gets_a_422(client: httpx.AsyncClient, path: str, body: object) -> None:
    response = await client.post(path, content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "invalid_request"
    assert answer["request_body"] == "\ufffd\ufffd{"


# --- defect 6: cross-site request forgery through a form or text/plain body -------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
@pytest.mark.parametrize(("path", "body"), HOT_POSTS)
async def test_a_body_not_declared_json_is_refused(
    client: httpx.AsyncClient, path: str, body: object, content_type: str | None
) -> None:
    """A web page can post a form or text/plain to any server without asking (no CORS
    preflight); only a JSON Content-Type is read as JSON, as on every other route."""
    await client.post(f"{V2}/", json={"name": "p", "limit": 5})
    headers = {} if content_type is None else {"content-type": content_type}
    content = httpx.Request("POST", "http://x", json=body).content
    response = await client.post(path, content=content, headers=headers)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "invalid_request"
    assert answer["exception_detail"][0]["type"] == "model_attributes_type"
    # Nothing was taken.
    limit = (await client.get(f"{V2}/p")).json()
    assert limit["active_slots"] == 0


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json"])
async def test_json_content_types_with_parameters_or_suffixes_are_read(
    client: httpx.AsyncClient, content_type: str
) -> None:
    await client.post(f"{V2}/", json={"name": "p", "limit": 5})
    content = httpx.Request("POST", "http://x", json={"names": ["p"], "slots": 2}).content
    response = await client.post(f"{V2}/increment", content=content, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert (await client.get(f"{V2}/p")).json()["active_slots"] == 2


# --- defect 1: a huge occupancy_seconds poisoned a limit's average for good -----------------------

HUGE = 1.7976931348623157e308


async def test_an_occupancy_beyond_the_bound_is_refused(client: httpx.AsyncClient) -> None:
    await client.post(f"{V2}/", json={"name": "p", "limit": 0})
    body = {"names": ["p"], "slots": 1, "occupancy_seconds": HUGE}
    response = await client.post(f"{V2}/decrement", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_request"
    assert response.json()["exception_detail"][0]["loc"] == ["body", "occupancy_seconds"]
    # Nothing changed: a release that is refused takes nothing from the pool.
    assert (await client.post(f"{V2}/increment", json={"names": ["p"], "slots": 1})).status_code == 422


async def test_the_largest_samples_keep_the_average_finite(storage: Storage, clock: FakeClock) -> None:
    """Below the API's bound, the storage's arithmetic itself stays finite: releases with the
    largest samples the rules take, then an ordinary lease that expires, and the reaper ends it."""
    await storage.create_limit(LimitSpec(name="p", limit=0))
    await storage.create_limit(LimitSpec(name="q", limit=10))
    for _ in range(100):
        await storage.release_slots(["p", "q"], 1, domain.MAX_OCCUPANCY_SECONDS)
        await storage.release_slots(["p", "q"], 1, HUGE)  # what the API refuses, if it came through
    for name in ("p", "q"):
        average = (await storage.read_limit(name)).limit.avg_slot_occupancy_seconds
        assert math.isfinite(average)
        assert average <= domain.MAX_OCCUPANCY_SECONDS
    await take(storage, "q", lease=60)
    clock.advance(61)
    assert await storage.reap_expired() == 1


async def test_a_stored_average_that_is_not_a_number_heals(storage: Storage, database_url: str) -> None:
    """PostgreSQL stored the NaN the overflow made (SQLite refused it, and every release after
    that answered 503): the next sample starts the average again from the default."""
    if not database_url.startswith("postgresql"):
        pytest.skip("only PostgreSQL stores NaN in a float column")
    await storage.create_limit(LimitSpec(name="p", limit=1))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE limits SET avg_slot_occupancy_seconds = 'NaN' WHERE name = 'p'")
    await storage.release_slots(["p"], 1, 10.0)
    average = (await storage.read_limit("p")).limit.avg_slot_occupancy_seconds
    assert average == pytest.approx(
        domain.next_avg_occupancy(domain.DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS, 10, 1, 1)
    )


def test_retry_after_from_an_average_that_is_not_a_number_is_the_default_ones() -> None:
    policy = domain.RetryPolicy(max_wait=30.0, rng=random.Random(7))
    broken = make_limit(avg_slot_occupancy_seconds=math.nan, limit=1, pool_slots=1)
    sane = make_limit(
        avg_slot_occupancy_seconds=domain.DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS, limit=1, pool_slots=1
    )
    hint = policy.seconds([broken], 1, NOW)
    assert hint == domain.RetryPolicy(max_wait=30.0, rng=random.Random(7)).seconds([sane], 1, NOW)
    assert hint > domain.MIN_RETRY_AFTER_SECONDS


async def test_one_lease_that_cannot_end_does_not_stop_the_reaper(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await storage.create_limit(LimitSpec(name="bad", limit=5))
    await storage.create_limit(LimitSpec(name="good", limit=5))
    bad = await take(storage, "bad", lease=60)
    good = await take(storage, "good", lease=60)
    clock.advance(61)
    slots = storage.scripts.slots
    end_expired = slots.end_expired

    def breaking(tx: Any, lease_id: str) -> bool:
        if lease_id == bad.lease_id:
            raise ZeroDivisionError("a broken limit")
        return end_expired(tx, lease_id)

    monkeypatch.setattr(slots, "end_expired", breaking)
    with caplog.at_level(logging.ERROR, logger="slotkeeper.reaper"):
        assert await storage.reap_expired() == 1
        assert not await storage.list_leases("good")
        lines = [r for r in caplog.records if bad.lease_id in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is not None
        # The next passes try it again, quietly: one line, not one per pass.
        assert await storage.reap_expired() == 0
        assert len([r for r in caplog.records if bad.lease_id in r.getMessage()]) == 1
    monkeypatch.setattr(slots, "end_expired", end_expired)
    assert await storage.reap_expired() == 1
    assert good.lease_id != bad.lease_id


# --- defect 4: unbounded names lists froze SQLite --------------------------------------------------

#: The routes that take a ``names`` list, with the rest of a valid body.
NAMED = [
    (f"{V2}/increment", {"slots": 1}),
    (f"{V2}/increment-with-lease", {"slots": 1}),
    (f"{V2}/decrement", {"slots": 1}),
    (f"{V1}/increment", {"task_run_id": "0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e"}),
    (f"{V1}/decrement", {"task_run_id": "0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e"}),
]


@pytest.mark.parametrize(("path", "rest"), NAMED)
async def test_more_names_than_the_default_cap_are_refused(
    client: httpx.AsyncClient, path: str, rest: dict[str, Any]
) -> None:
    names = [f"n{i}" for i in range(Settings().max_names + 1)]
    response = await client.post(path, json={"names": names, **rest})
    assert response.status_code == 422, response.text
    error = response.json()["exception_detail"][0]
    assert (response.json()["code"], error["type"], error["loc"]) == (
        "invalid_request",
        "too_long",
        ["body", "names"],
    )
    assert "SLOTKEEPER_MAX_NAMES" in error["msg"]


@pytest.mark.parametrize(("path", "rest"), NAMED)
async def test_the_names_cap_is_a_setting_checked_before_storage(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, rest: dict[str, Any]
) -> None:
    app = create_app(Settings(home=tmp_path, max_names=3), storage=storage)

    def untouched(*args: object, **kwargs: object) -> None:
        raise AssertionError("storage was asked")

    async with app.router.lifespan_context(app):
        for method in ("acquire", "release_slots", "_run"):
            monkeypatch.setattr(storage, method, untouched)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            response = await http.post(path, json={"names": ["a", "b", "c", "d"], **rest})
        monkeypatch.undo()
    assert response.status_code == 422, response.text
    assert response.json()["exception_detail"][0]["ctx"]["max_length"] == 3


# --- defect 9: dates at the edges of the calendar --------------------------------------------------

#: In UTC these are in year 10000 and year 0: no datetime can hold them.
EDGES = ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"]


@pytest.mark.parametrize("edge", EDGES)
async def test_an_event_at_the_calendar_edge_is_refused(
    api: httpx.AsyncClient, clock: FakeClock, edge: str
) -> None:
    response = await api.post("/events", json=[{**wire(clock), "occurred": edge}])
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_request"
    assert "out of range" in response.text


@pytest.mark.parametrize("bound", ["since", "until"])
@pytest.mark.parametrize("edge", EDGES)
async def test_a_filter_at_the_calendar_edge_is_refused(
    api: httpx.AsyncClient, edge: str, bound: str
) -> None:
    for path in ("/events/filter", "/events/count-by/event"):
        response = await api.post(path, json={"filter": {"occurred": {bound: edge}}})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["code"] == "invalid_request"


@pytest.mark.parametrize("edge", EDGES)
async def test_a_page_token_at_the_calendar_edge_is_forbidden(api: httpx.AsyncClient, edge: str) -> None:
    token = _token({**VALID_INNER, "filter": {"occurred": {"since": edge}}})
    response = await api.get("/events/filter/next", params={"page-token": token})
    assert response.status_code == 403, response.text
    assert response.json() == {"detail": "Forbidden", "code": "invalid_page_token"}


async def test_the_widest_dates_that_exist_are_served(api: httpx.AsyncClient, clock: FakeClock) -> None:
    await post(api, wire(clock))
    widest = {"since": "0001-01-01T00:00:00+00:00", "until": "9999-12-31T23:59:59.999999+00:00"}
    assert len(await stored(api, filter={"occurred": widest})) == 1


# --- defect 12: years before 1000 are written with four digits -------------------------------------


def test_times_before_year_1000_are_iso_8601() -> None:
    moment = datetime(999, 6, 15, 12, 30, 1, tzinfo=UTC)  # whole seconds: floats this far back
    assert iso(moment.timestamp()) == "0999-06-15T12:30:01.000000Z"
    assert iso(datetime(1, 1, 1, tzinfo=UTC).timestamp()) == "0001-01-01T00:00:00.000000Z"
    assert datetime.fromisoformat(iso(moment.timestamp())) == moment
    record = EventRecord(
        "e", moment.timestamp(), "x", {"prefect.resource.id": "r"}, received=moment.timestamp()
    )
    assert EventRecord.from_wire(record.wire()) == record


async def test_an_event_before_year_1000_round_trips(api: httpx.AsyncClient, clock: FakeClock) -> None:
    sent = {**wire(clock), "occurred": "0999-06-15T12:30:01+00:00"}
    assert (await post(api, sent)).status_code == 204
    since = {"since": "0001-01-01T00:00:00+00:00"}
    [event] = await stored(api, filter={"occurred": since})
    assert event["occurred"] == "0999-06-15T12:30:01.000000Z"


async def test_a_live_event_before_year_1000_does_not_stop_live_delivery(storage: Storage) -> None:
    """On PostgreSQL, live events come back through LISTEN as their wire JSON: one dated before
    year 1000 could not be read back, and killed the listener for good."""
    delivered: asyncio.Queue[list[EventRecord] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    stop = storage.subscribe_events(lambda events: loop.call_soon_threadsafe(delivered.put_nowait, events))
    try:
        events = storage.event_store()
        ancient = datetime(999, 6, 15, tzinfo=UTC).timestamp()
        for name, occurred in (("ancient", ancient), ("recent", storage.clock())):
            record = EventRecord(str(uuid.uuid4()), occurred, name, {"prefect.resource.id": "r"})
            await events.ingest([record])
        seen: list[str] = []
        async with asyncio.timeout(30):  # a bound against hanging, not an expectation
            while "recent" not in seen:
                batch = await delivered.get()
                seen.extend(e.event for e in batch or [])
        assert seen == ["ancient", "recent"]
    finally:
        stop()


# --- defect 8: a NUL character in an event filter string -------------------------------------------

#: Every string of a filter, each with a NUL in it.
NUL_FILTERS = [
    {"event": {"prefix": ["a\x00"]}},
    {"event": {"name": ["a\x00b"]}},
    {"resource": {"id": ["\x00"]}},
    {"resource": {"id_prefix": ["r\x00"]}},
    {"resource": {"labels": {"k\x00": "v"}}},
    {"resource": {"labels": {"k": ["v\x00"]}}},
    {"related": {"role": ["\x00"]}},
    {"related": [{"resources_in_roles": [["r", "\x00"]]}]},
    {"any_resource": {"id": ["\x00"]}},
    {"text": {"query": "a\x00"}},
]


@pytest.mark.parametrize("event_filter", NUL_FILTERS)
async def test_a_nul_in_a_filter_string_is_a_422(
    api: httpx.AsyncClient, event_filter: dict[str, Any]
) -> None:
    for path in ("/events/filter", "/events/count-by/event"):
        response = await api.post(path, json={"filter": event_filter})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["code"] == "invalid_request"
        assert "NUL" in response.text


async def test_a_nul_in_a_page_token_filter_is_forbidden(api: httpx.AsyncClient) -> None:
    token = _token({**VALID_INNER, "filter": {"event": {"prefix": ["\x00"]}}})
    response = await api.get("/events/filter/next", params={"page-token": token})
    assert response.json() == {"detail": "Forbidden", "code": "invalid_page_token"}


async def test_a_nul_in_a_live_filter_closes_the_websocket_with_a_code(served: Served) -> None:
    async with served.http.ws_connect(served.ws_url + "/events/out", protocols=["prefect"]) as ws:
        await authenticate(ws)
        await ws.send_json({"type": "filter", "filter": {"event": {"prefix": ["\x00"]}}})
        code, reason = await closed_with(ws)
    assert code == 1002
    assert reason.startswith("Invalid filter: ") and "NUL" in reason


# --- defect 11: a client that leaves mid-body was logged as a bug, with its traceback ------------


@pytest.mark.parametrize(
    "path", [f"/api{path}" for path, _ in HOT_POSTS] + ["/api/v2/concurrency_limits/filter", "/api/events"]
)
async def test_a_client_that_leaves_mid_body_is_one_quiet_line(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    app = create_app(Settings(home=tmp_path), storage=storage)
    incoming = [
        {"type": "http.request", "body": b'{"names": ["p"', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 4200),
    }
    async with app.router.lifespan_context(app):
        with caplog.at_level(logging.INFO):
            await app(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text


# --- smaller: the Allow header of a 405 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        # POST is the path's own method, not the methods of a limit's path ({id_or_name}).
        (f"{V2}/increment", {"POST"}),
        (f"{V2}/decrement-with-lease", {"POST"}),
        (f"{V2}/filter", {"POST"}),
        (f"{V2}/some-limit", {"GET", "PATCH", "DELETE"}),
        ("/events", {"POST"}),
        ("/health", {"GET"}),
    ],
)
async def test_a_405_allows_every_method_of_its_path(
    client: httpx.AsyncClient, path: str, allowed: set[str]
) -> None:
    response = await client.put(path, json={})
    assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == allowed


# --- smaller: the auth scheme is case-insensitive --------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc", "Basic  "])
async def test_the_basic_auth_scheme_is_case_insensitive(
    storage: Storage, tmp_path: Path, scheme: str
) -> None:
    app = create_app(Settings(home=tmp_path, api_auth_string="user:pass"), storage=storage)
    credentials = base64.b64encode(b"user:pass").decode()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            for header in (f"{scheme} {credentials}", f"{scheme} {credentials[:-2]}"):
                response = await http.post(f"{V2}/filter", headers={"Authorization": header})
                assert response.status_code == (200 if header.endswith(credentials) else 401)


# --- smaller: the OpenAPI document says what the server answers ------------------------------------


async def test_the_openapi_document_lists_the_real_errors(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    paths = document["paths"]

    def statuses(method: str, path: str) -> set[str]:
        return set(paths[f"/api{path}"][method]["responses"])

    assert {"401", "413", "422", "503", "404"} <= statuses("get", f"{V2}/{{id_or_name}}")
    assert {"404", "409"} <= statuses("patch", f"{V2}/{{id_or_name}}")
    assert "409" in statuses("post", f"{V2}/")
    assert "423" in statuses("post", f"{V2}/increment-with-lease")
    assert "410" in statuses("post", f"{V2}/leases/{{lease_id}}/renew")
    assert "403" in statuses("get", "/events/filter/next")
    increment = paths[f"/api{V2}/increment"]["post"]["responses"]
    assert "Retry-After" in increment["423"]["headers"]
    invalid = increment["422"]["content"]["application/json"]["schema"]["anyOf"]
    assert {"$ref": "#/components/schemas/InvalidRequest"} in invalid
    # What the server sends is that shape.
    answer = (await client.post(f"{V2}/increment", json={})).json()
    required = document["components"]["schemas"]["InvalidRequest"]["required"]
    assert set(required) <= set(answer)


@pytest.mark.parametrize(
    ("origin", "host", "refused"),
    [
        (None, "127.0.0.1:4200", False),  # Python clients send no Origin
        ("", "127.0.0.1:4200", False),
        ("http://127.0.0.1:4200", "127.0.0.1:4200", False),  # the dashboard, served by this server
        ("http://LOCALHOST:4200", "localhost:4200", False),
        ("https://evil.example", "127.0.0.1:4200", True),
        ("http://127.0.0.1:4201", "127.0.0.1:4200", True),
        ("null", "127.0.0.1:4200", True),  # a sandboxed page or a file
        ("http://[::1", "127.0.0.1:4200", True),  # unparsable
    ],
)
def test_a_websocket_upgrade_from_another_site_is_cross_origin(
    origin: str | None, host: str, refused: bool
) -> None:
    from slotkeeper.api.middleware import cross_origin

    assert cross_origin(origin, host) is refused
