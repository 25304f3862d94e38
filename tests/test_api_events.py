"""The event REST API through the real ASGI app, on both backends (reference §6.6)."""

from __future__ import annotations

import base64
import string
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import psycopg
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.api.events import NEXT_PAGE_ROUTE, page_token, read_page_token, router
from slotkeeper.events import builders
from slotkeeper.events.models import EventFilter
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from slotkeeper.storage.events import PIVOT, EventStore
from tests.conftest import FakeClock


@pytest.fixture
async def api(storage: Storage, settings: Settings, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    """The ``client`` fixture's app, with the event router and an EventStore on the fake clock."""
    if storage.backend.name == "postgresql":
        with psycopg.connect(storage.backend.conninfo, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute("TRUNCATE events, event_resources")  # conftest empties the limit tables only
    # The app's own retention job must not race the tests: keep events for ~30,000 years.
    app = create_app(settings.model_copy(update={"events_retention_seconds": 1e12}), storage=storage)
    if not any(getattr(route, "name", None) == NEXT_PAGE_ROUTE for route in app.routes):
        app.include_router(router, prefix="/api")
    async with app.router.lifespan_context(app):
        app.state.events = EventStore(storage.backend, clock)  # after start-up: this one wins
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


#: For refusals decided before storage is touched: one backend is enough (app start-up and
#: shutdown on PostgreSQL cost about half a second per test).
refusal = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wire(
    clock: FakeClock, name: str = "test.happened", rid: str = "r.1", at: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """An event as a client sends it, ``at`` seconds from the clock's now."""
    return {
        "occurred": iso(clock() + at),
        "event": name,
        "resource": {"prefect.resource.id": rid},
        "id": str(uuid.uuid4()),
        **extra,
    }


async def post(api: httpx.AsyncClient, *events: dict[str, Any]) -> httpx.Response:
    return await api.post("/events", json=list(events))


async def stored(api: httpx.AsyncClient, **body: Any) -> list[dict[str, Any]]:
    response = await api.post("/events/filter", json=body)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


# --- POST /events -----------------------------------------------------------------------------------


async def test_post_events_then_read_them_back(api: httpx.AsyncClient, clock: FakeClock) -> None:
    related = [{"prefect.resource.id": "prefect.tag.db", "prefect.resource.role": "tag"}]
    first = wire(clock, at=-1, payload={"k": [1, "two"]}, related=related, follows=str(uuid.uuid4()))
    second = wire(clock, "other.thing", unknown_key="ignored")
    response = await post(api, first, second)
    assert (response.status_code, response.content) == (204, b"")
    response = await api.post("/events/filter", json={})
    assert response.status_code == 200
    page = response.json()
    assert page["total"] == 2 and page["next_page"] is None
    newest, oldest = page["events"]
    assert newest == {
        "occurred": second["occurred"],
        "event": "other.thing",
        "resource": {"prefect.resource.id": "r.1"},
        "related": [],
        "payload": {},
        "id": second["id"],
        "follows": None,
        "received": iso(clock()),  # set by the server, on its clock
    }
    assert (oldest["related"], oldest["payload"], oldest["follows"]) == (
        related,
        {"k": [1, "two"]},
        first["follows"],
    )


async def test_filter_without_a_body_uses_the_default_filter(
    api: httpx.AsyncClient, clock: FakeClock
) -> None:
    await post(api, wire(clock), wire(clock, at=-181 * 86400))  # the second is too old
    response = await api.post("/events/filter")
    assert response.status_code == 200 and response.json()["total"] == 1
    assert (await api.post("/events/filter", json={"filter": None})).json()["total"] == 1


async def test_duplicates_and_slot_event_copies_are_acknowledged_not_stored(
    api: httpx.AsyncClient, clock: FakeClock
) -> None:
    event = wire(clock)
    assert (await post(api, event, event)).status_code == 204
    assert (await post(api, event)).status_code == 204
    copies = [wire(clock, name) for name in sorted(builders.SLOT_EVENTS)]
    assert (await post(api, *copies)).status_code == 204
    assert [e["id"] for e in await stored(api)] == [event["id"]]


async def test_server_slot_events_are_the_only_ones(api: httpx.AsyncClient, clock: FakeClock) -> None:
    assert (await api.post("/v2/concurrency_limits/", json={"name": "db", "limit": 1})).status_code == 201
    response = await api.post(
        "/v2/concurrency_limits/increment-with-lease", json={"names": ["db"], "slots": 1}
    )
    assert response.status_code == 200
    only_acquired = {"filter": {"event": {"name": [builders.ACQUIRED]}}}
    (server,) = await stored(api, **only_acquired)
    copy = wire(clock, builders.ACQUIRED, server["resource"]["prefect.resource.id"])
    copy["resource"] = server["resource"]
    assert (await post(api, copy)).status_code == 204
    assert await stored(api, **only_acquired) == [server]


def _resource(**labels: Any) -> dict[str, Any]:
    return {"prefect.resource.id": "r.1", **labels}


INVALID = {
    "non-string label value": {"resource": _resource(n=1)},
    "null label value": {"resource": _resource(n=None)},
    "missing resource id": {"resource": {"name": "x"}},
    "empty resource id": {"resource": {"prefect.resource.id": ""}},
    "related without role": {"related": [{"prefect.resource.id": "t.1"}]},
    "related with empty role": {"related": [{"prefect.resource.id": "t.1", "prefect.resource.role": ""}]},
    "501 labels": {"resource": _resource(**{f"l{i}": "v" for i in range(500)})},
    "101 related": {
        "related": [{"prefect.resource.id": f"t.{i}", "prefect.resource.role": "tag"} for i in range(101)]
    },
    "name of 1025 characters": {"event": "e" * 1025},
    "empty name": {"event": ""},
    "no occurred": {"occurred": None},
    "no id": {"id": None},
    "bad id": {"id": "not-a-uuid"},
    "payload not an object": {"payload": [1]},
}


@refusal
@pytest.mark.parametrize("change", INVALID.values(), ids=INVALID.keys())
async def test_one_invalid_event_refuses_the_whole_batch(
    api: httpx.AsyncClient, clock: FakeClock, change: dict[str, Any]
) -> None:
    bad = {k: v for k, v in {**wire(clock), **change}.items() if v is not None}
    response = await post(api, wire(clock), bad)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["exception_message"] == "Invalid request received."
    assert body["exception_detail"][0]["loc"][:2] == ["body", 1]
    assert await stored(api) == []


async def test_limits_are_inclusive(api: httpx.AsyncClient, clock: FakeClock) -> None:
    at_limits = wire(
        clock,
        "e" * 1024,
        resource=_resource(**{f"l{i}": "v" for i in range(499)}),  # 500 labels with the id
        related=[{"prefect.resource.id": f"t.{i}", "prefect.resource.role": "tag"} for i in range(100)],
    )
    assert (await post(api, at_limits)).status_code == 204
    assert len(await stored(api)) == 1


@refusal
async def test_an_event_over_1_5_mb_is_refused(api: httpx.AsyncClient, clock: FakeClock) -> None:
    # 750,000 characters, but two bytes each in UTF-8: the limit counts bytes, as Prefect's.
    response = await post(api, wire(clock), wire(clock, payload={"blob": "é" * 750_000}))
    assert response.status_code == 422
    assert len(response.content) < 1000  # the event is not echoed back
    (error,) = response.json()["exception_detail"]
    assert error["loc"] == ["body", 1]
    assert "the limit is 1500000 bytes" in error["msg"]
    assert await stored(api) == []


@refusal
@pytest.mark.parametrize(
    "change",
    [{"event": "nul\u0000"}, {"resource": _resource(k="v\u0000")}, {"payload": {"n": 2**70}}],
    ids=["NUL in a name", "NUL in a label", "integer beyond 64 bits"],
)
async def test_events_the_database_cannot_hold_are_refused(
    api: httpx.AsyncClient, clock: FakeClock, change: dict[str, Any]
) -> None:
    response = await post(api, {**wire(clock), **change})
    assert response.status_code == 422, response.text
    assert await stored(api) == []


@refusal
async def test_post_events_needs_an_array(api: httpx.AsyncClient, clock: FakeClock) -> None:
    assert (await api.post("/events", json=wire(clock))).status_code == 422
    assert (await api.post("/events", json=[])).status_code == 204


# --- POST /events/filter ----------------------------------------------------------------------------


@refusal
@pytest.mark.parametrize(
    "body",
    [
        {"filter": {"unknown": 1}},
        {"filter": {"event": {"prefix": ["a"], "unknown": 1}}},
        {"filter": {"resource": {"labels": {"k": 1}}}},
        {"filter": {"order": "SIDEWAYS"}},
        {"limit": 51},
        {"limit": -1},
        {"filter": {"text": {"query": "x" * 201}}},
    ],
    ids=[
        "unknown key",
        "unknown nested key",
        "bad label spec",
        "bad order",
        "limit 51",
        "limit -1",
        "query 201",
    ],
)
async def test_filter_validation(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await api.post("/events/filter", json=body)
    assert response.status_code == 422
    assert response.json()["exception_detail"][0]["loc"][0] == "body"


async def test_filter_applies_criteria(api: httpx.AsyncClient, clock: FakeClock) -> None:
    tag = [{"prefect.resource.id": "prefect.tag.db", "prefect.resource.role": "tag"}]
    a = wire(clock, "flow.started", "prefect.flow-run.1", at=-1, related=tag)
    b = wire(clock, "flow.finished", "prefect.flow-run.2")
    await post(api, a, b)
    names = await stored(api, filter={"related": {"role": ["tag"]}})
    assert [e["id"] for e in names] == [a["id"]]
    both = await stored(api, filter={"text": {"query": "flow"}, "order": "ASC"})
    assert [e["id"] for e in both] == [a["id"], b["id"]]
    assert await stored(api, filter={"text": {"query": "x" * 200}}) == []
    assert await stored(api, limit=0) == []


# --- paging -----------------------------------------------------------------------------------------


def token_of(next_page: str) -> str:
    query = urlsplit(next_page).query
    assert query.startswith("page-token=")
    return query.removeprefix("page-token=")


async def test_paging_across_three_pages(api: httpx.AsyncClient, clock: FakeClock) -> None:
    events = [wire(clock, at=-i) for i in range(7)]
    await post(api, *events)
    expected = [e["id"] for e in events]  # newest first

    first = (await api.post("/events/filter", json={"limit": 3})).json()
    assert first["total"] == 7
    assert first["next_page"].startswith("http://test/api/events/filter/next?page-token=")
    inner = orjson.loads(base64.b64decode(base64.b64decode(token_of(first["next_page"]))))
    assert (inner["count"], inner["page_size"], inner["offset"]) == (7, 3, 3)
    assert inner["filter"]["occurred"]["until"] == iso(clock()).replace(".000000", "")  # frozen

    clock.advance(60)  # later events do not shift the frozen pages
    await post(api, wire(clock))

    second = (await api.get(first["next_page"])).json()
    assert second["total"] == 7 and second["next_page"]
    third = (await api.get(second["next_page"])).json()
    assert third["total"] == 7 and third["next_page"] is None
    ids = [e["id"] for page in (first, second, third) for e in page["events"]]
    assert ids == expected


def test_page_tokens_round_trip_and_need_no_url_escaping() -> None:
    for n in range(300):
        event_filter = EventFilter.model_validate({"text": {"query": f"+q{n}/é?&"}})
        token = page_token(event_filter, 100, 10, 10)
        assert token is not None
        assert set(token) <= set(string.ascii_letters + string.digits + "=")  # base64 of base64
        assert read_page_token(token) == (event_filter, 100, 10, 10)
    assert page_token(event_filter, 10, 10, 10) is None  # offset reached the count
    assert page_token(event_filter, 10, 0, 0) is None  # a page size of 0 never advances


def _token(inner: Any) -> str:
    return base64.b64encode(base64.b64encode(orjson.dumps(inner))).decode()


VALID_INNER = {"filter": {}, "count": 5, "page_size": 2, "offset": 2}


@refusal
@pytest.mark.parametrize(
    "token",
    [
        "",
        "not base64!",
        base64.b64encode(b"").decode(),
        base64.b64encode(b"garbage").decode(),
        base64.b64encode(base64.b64encode(b"not json")).decode(),
        _token({}),
        _token([1, 2]),
        _token({**VALID_INNER, "filter": {"unknown": 1}}),
        _token({**VALID_INNER, "page_size": 1000}),
        _token({**VALID_INNER, "offset": -1}),
        _token({**VALID_INNER, "count": "5"}),
        _token({**VALID_INNER, "offset": 2**60}),
        _token({**VALID_INNER, "page_size": True}),
    ],
    ids=[
        "empty",
        "not base64",
        "empty inner",
        "inner not base64",
        "not json",
        "no keys",
        "not an object",
        "bad filter",
        "page too large",
        "negative offset",
        "count not int",
        "offset too large",
        "page size a boolean",
    ],
)
async def test_bad_page_tokens_are_forbidden(api: httpx.AsyncClient, token: str) -> None:
    response = await api.get("/events/filter/next", params={"page-token": token})
    assert response.status_code == 403
    assert response.json() == {"detail": "Forbidden", "code": "invalid_page_token"}


async def test_a_valid_handmade_token_pages(api: httpx.AsyncClient, clock: FakeClock) -> None:
    await post(api, *(wire(clock, at=-i) for i in range(3)))
    inner = {**VALID_INNER, "filter": {"occurred": {"since": iso(clock() - 60), "until": iso(clock())}}}
    response = await api.get("/events/filter/next", params={"page-token": _token(inner)})
    assert response.status_code == 200
    page = response.json()
    # The count is frozen in the token: 5, though only 3 events exist; so there is a next page.
    assert (len(page["events"]), page["total"]) == (1, 5)
    last = (await api.get(page["next_page"])).json()
    assert (last["events"], last["total"], last["next_page"]) == ([], 5, None)


@refusal
async def test_next_page_needs_a_token(api: httpx.AsyncClient) -> None:
    assert (await api.get("/events/filter/next")).status_code == 422


# --- count-by ---------------------------------------------------------------------------------------


async def test_count_by_event_and_resource(api: httpx.AsyncClient, clock: FakeClock) -> None:
    await post(
        api,
        wire(
            clock, "a.event", "r.1", resource={"prefect.resource.id": "r.1", "prefect.resource.name": "one"}
        ),
        wire(clock, "a.event", "r.2", at=-5),
        wire(clock, "b.event", "r.1", at=-10),
    )
    body: dict[str, Any] = {"filter": {}}
    by_event = (await api.post("/events/count-by/event", json=body)).json()
    assert [(c["value"], c["label"], c["count"]) for c in by_event] == [
        ("a.event", "a.event", 2),
        ("b.event", "b.event", 1),
    ]
    assert by_event[0]["start_time"] == iso(clock() - 5) and by_event[0]["end_time"] == iso(clock())
    by_resource = (await api.post("/events/count-by/resource", json=body)).json()
    assert [(c["value"], c["label"], c["count"]) for c in by_resource] == [
        ("r.1", "one", 2),
        ("r.2", "r.2", 1),
    ]


async def test_count_by_day_and_time(api: httpx.AsyncClient, clock: FakeClock) -> None:
    clock.now = (PIVOT + timedelta(days=1000, hours=12)).timestamp()
    await post(api, wire(clock), wire(clock, at=-86400), wire(clock, at=-86400 - 60))
    since = iso(clock() - 2 * 86400)
    days = (await api.post("/events/count-by/day", json={"filter": {"occurred": {"since": since}}})).json()
    assert [(c["value"], c["count"]) for c in days] == [("0", 0), ("1", 2), ("2", 1)]
    assert days[1]["label"] == (PIVOT + timedelta(days=999)).isoformat()
    assert days[1]["start_time"] == "2026-12-26T00:00:00.000000Z"
    assert days[1]["end_time"] == "2026-12-26T23:59:59.999999Z"
    body = {"filter": {"occurred": {"since": since}}, "time_unit": "hour", "time_interval": 12}
    halves = (await api.post("/events/count-by/time", json=body)).json()
    assert [c["count"] for c in halves] == [0, 1, 1, 0, 1]


@refusal
async def test_count_by_refusals(api: httpx.AsyncClient, clock: FakeClock) -> None:
    response = await api.post("/events/count-by/time", json={"filter": {}, "time_interval": 0.001})
    assert response.status_code == 422
    assert response.json()["exception_detail"][0]["loc"] == ["body", "time_interval"]
    response = await api.post("/events/count-by/time", json={"filter": {}, "time_unit": "minute"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("The given interval would create")
    assert "1000 buckets or fewer" in response.json()["detail"]
    for path, body in [
        ("/events/count-by/week", {"filter": {}}),
        ("/events/count-by/day", {}),
        ("/events/count-by/day", {"filter": {"unknown": 1}}),
        ("/events/count-by/time", {"filter": {}, "time_unit": "fortnight"}),
    ]:
        assert (await api.post(path, json=body)).status_code == 422, (path, body)


# --- retention --------------------------------------------------------------------------------------


async def test_retention_removes_old_events_from_the_api(api: httpx.AsyncClient, clock: FakeClock) -> None:
    old, new = wire(clock, at=-8 * 86400), wire(clock)
    await post(api, old, new)
    assert len(await stored(api)) == 2
    store: EventStore = api.app.state.events  # type: ignore[attr-defined]
    assert await store.delete_older_than(clock() - 7 * 86400) == 1
    assert [e["id"] for e in await stored(api)] == [new["id"]]
