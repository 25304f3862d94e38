"""Hostile clients of the events API cannot hurt the server (issue 11).

Each test pins one defect a fuzzer or a hand-written attack found, and failed before its fix:
websocket frames the endpoints do not speak and handshakes that never come (defect 10), a slow
subscriber's queue bounded by bytes as well as by count (defect 5), filters bounded in size and
matched in linear time (defect 2), event queries planned in linear time, stopped at a deadline and
run on a pool of their own (defect 3), and background loops that cannot die silently: a bad
notification skipped, a dead loop restarted, readiness failed while one keeps failing (defect 12).

Nothing is timed: a wait is bounded (``BOUND`` seconds) only so that a broken server fails the
test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import psycopg
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.errors import StorageClosed
from slotkeeper.events import filters
from slotkeeper.events.models import EventFilter, EventRecord
from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, open_storage, waiting
from slotkeeper.storage import backend as transactions
from slotkeeper.storage.tx import Tx
from tests.conftest import take
from tests.test_broker import Collected, record, writer
from tests.test_websockets import (
    authenticate,
    client_event,
    closed_with,
    next_event,
    receive,
    served_app,
    subscribed,
    wait_until_subscribed,
)

# --- websockets: frames and handshakes (defect 10) ----------------------------------------------


@pytest.mark.parametrize("path", ["/events/out", "/events/in"])
@pytest.mark.parametrize("stage", ["auth", "after auth"])
async def test_a_binary_frame_closes_with_1003(
    storage: Storage, tmp_path: Path, path: str, stage: str
) -> None:
    async with served_app(storage, tmp_path) as served:
        async with served.http.ws_connect(served.ws_url + path, protocols=["prefect"]) as ws:
            if stage == "after auth":
                await authenticate(ws)
            await ws.send_bytes(b'{"type": "auth"}')
            assert await closed_with(ws) == (1003, "Binary frames are not supported: send JSON text")
        # The server still serves the next client.
        async with served.http.ws_connect(served.ws_url + path, protocols=["prefect"]) as ws:
            await authenticate(ws)


@pytest.mark.parametrize("path", ["/events/out", "/events/in"])
async def test_a_socket_that_never_authenticates_is_closed_with_1008(
    storage: Storage, tmp_path: Path, path: str
) -> None:
    async with (
        served_app(storage, tmp_path, websocket_auth_timeout_seconds=0.2) as served,
        served.http.ws_connect(served.ws_url + path, protocols=["prefect"]) as ws,
    ):
        assert await closed_with(ws) == (1008, "Handshake not completed within 0.2 s")


@pytest.mark.parametrize("legacy", [False, True])
async def test_a_subscriber_that_never_sends_its_filter_is_closed_with_1008(
    storage: Storage, tmp_path: Path, legacy: bool
) -> None:
    async with served_app(storage, tmp_path, websocket_auth_timeout_seconds=0.2) as served:
        protocols = [] if legacy else ["prefect"]
        async with served.http.ws_connect(served.ws_url + "/events/out", protocols=protocols) as ws:
            if not legacy:
                await authenticate(ws)
            assert await closed_with(ws) == (1008, "Handshake not completed within 0.2 s")
        assert served.app.state.broker.subscribers == 0


async def test_an_authenticated_ingest_socket_may_stay_quiet(storage: Storage, tmp_path: Path) -> None:
    """The deadline is the handshake's only: a client that authenticated may send when it likes."""
    async with (
        served_app(storage, tmp_path, websocket_auth_timeout_seconds=0.2) as served,
        served.http.ws_connect(served.ws_url + "/events/in", protocols=["prefect"]) as ws,
    ):
        await authenticate(ws)
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.5)  # nothing comes: no close after the deadline
        assert not ws.closed
        await ws.send_str(json.dumps({"not": "an event"}))
        code, _ = await closed_with(ws)
        assert code == 1007


# --- a slow subscriber's queue, in bytes (defect 5) -------------------------------------------------


async def test_a_subscriber_that_falls_behind_in_bytes_is_cut_off_with_1013(
    storage: Storage, tmp_path: Path
) -> None:
    blob = "x" * 100_000
    async with (
        served_app(storage, tmp_path, events_subscriber_queue_bytes=250_000) as served,
        subscribed(served) as slow,
        subscribed(served, {"event": {"name": ["small"]}}) as other,
    ):
        await wait_until_subscribed(served, 2)
        # One batch, so the broker queues it at once: the slow subscriber's third event does not
        # fit in 250 kB, whatever it has read meanwhile.
        batch = [client_event("big", payload={"blob": blob}) for _ in range(5)] + [client_event("small")]
        await served.post("/events", batch, 204)
        frames = []
        while True:
            msg = await receive(slow)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frames.append(json.loads(msg.data)["event"]["id"])
        assert (msg.data, msg.extra) == (1013, "Subscriber too slow: more than 250000 bytes queued")
        assert frames == [e["id"] for e in batch[:2]]
        assert (await next_event(other))["id"] == batch[-1]["id"]
        assert served.app.state.broker.subscribers == 1


# --- filters: bounded, matched in linear time (defect 2) -------------------------------------------


def test_a_long_pattern_against_a_long_label_is_one_pass() -> None:
    """``"*" + "a"*3000 + "b"`` against a 30 kB label took 15.7 s with the backtracking matcher
    (the event loop answered nothing meanwhile); segments found with string searches take
    microseconds. Here 100 times the label, so the old matcher would run for hours."""
    label = "a" * 3_000_000
    assert not filters.glob_matches("*" + "a" * 3000 + "b", label)
    assert filters.glob_matches("*" + "a" * 3000, label)
    assert not filters.glob_matches("*" + "a" * 999 + "?" + "a" * 2000 + "b*", "a" * 30_000)
    assert filters.glob_matches("*a*" * 500 + "a", label)
    assert not filters.glob_matches("*a" * 1000 + "b", label)


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("a*b*c", "abc", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "acb", False),
        ("*ab", "ab", True),
        ("ab*ab", "ab", False),  # the anchored ends may not overlap
        ("ab*ab", "abab", True),
        ("a?*?c", "abc", False),
        ("a?*?c", "abbc", True),
        ("*?b?*", "xbx", True),
        ("*?b?*", "bx", False),
        ("a**b", "ab", True),
        ("?", "\n", True),
        ("*a?c*", "ab\nabc", True),
    ],
)
def test_the_segment_matcher_keeps_the_glob_semantics(pattern: str, value: str, expected: bool) -> None:
    assert filters.glob_matches(pattern, value) is expected


def _record(resource_id: str, name: str = "x.happened") -> EventRecord:
    return EventRecord(
        id=str(uuid.uuid4()),
        occurred=1_800_000_000.0,
        event=name,
        resource={"prefect.resource.id": resource_id},
        received=1_800_000_000.0,
    )


def test_a_compiled_matcher_looks_ids_up_in_sets() -> None:
    """1M resource ids made posting 2,000 events take 20 s (a list scanned per event); the
    matcher holds sets, built once per subscription."""
    ids = [f"r.{i}" for i in range(1000)]
    event_filter = EventFilter.model_validate(
        {
            "occurred": {"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"},
            "resource": {"id": ids},
            "event": {"prefix": [f"p{i}." for i in range(999)] + ["x."]},
        }
    )
    matcher = filters.matcher(event_filter)
    assert isinstance(matcher.resource.ids, frozenset)  # type: ignore[union-attr]
    assert matcher(_record("r.999"))
    assert not matcher(_record("r.1000"))
    assert not matcher(_record("r.5", name="y.happened"))


BOUNDS = {"events_filter_max_values": 10, "events_filter_max_resource_filters": 3}


@pytest.fixture
async def bounded(storage: Storage, settings: Settings) -> Any:
    app = create_app(settings.model_copy(update=BOUNDS), storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            yield http


TOO_LARGE = [
    ({"resource": {"id": [f"r.{i}" for i in range(11)]}}, "resource.id has 11 values; the limit is 10"),
    ({"event": {"prefix": ["p"] * 11}}, "event.prefix has 11 values; the limit is 10"),
    ({"related": [{"role": ["x"]}] * 4}, "related has 4 filters; the limit is 3"),
    ({"any_resource": [{"id": ["x"]}] * 4}, "any_resource has 4 filters; the limit is 3"),
    ({"related": {"resources_in_roles": [["a", "b"]] * 11}}, "related.resources_in_roles has 11 values"),
    ({"resource": {"labels": {f"l{i}": "x" for i in range(11)}}}, "resource.labels has 11 values"),
    ({"any_resource": {"labels": {"l": ["x"] * 11}}}, "any_resource.labels has 11 values"),
    ({"id": {"id": [str(uuid.uuid4()) for _ in range(11)]}}, "id.id has 11 values; the limit is 10"),
    (
        {"resource": {"labels": {"l": "*" + "a" * 3000 + "b"}}},
        "resource.labels has a value of 3002 characters; the limit is 1024",
    ),
    (
        {"related": {"labels": {"l": "*" + "a?" * 33 + "*"}}},
        "related.labels has a pattern with a run of 66 characters holding '?' between '*'; the limit is 64",
    ),
]


@pytest.mark.parametrize(("event_filter", "detail"), TOO_LARGE)
async def test_a_filter_beyond_the_bounds_is_a_422_with_its_code(
    bounded: httpx.AsyncClient, event_filter: dict[str, Any], detail: str
) -> None:
    for path, body in (
        ("/events/filter", {"filter": event_filter}),
        ("/events/count-by/event", {"filter": event_filter}),
    ):
        response = await bounded.post(path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "filter_too_large"
        assert response.json()["detail"].startswith(detail)


async def test_a_filter_at_the_bounds_is_served(bounded: httpx.AsyncClient) -> None:
    event_filter = {
        "resource": {
            "id": [f"r.{i}" for i in range(10)],
            "labels": {"l": ["*" + "a" * 1000 + "b", "x*" + "a?" * 32 + "*y"]},
        },
        "related": [{"role": ["x"]}] * 3,
    }
    response = await bounded.post("/events/filter", json={"filter": event_filter})
    assert response.status_code == 200, response.text


async def test_a_page_token_beyond_the_bounds_is_refused_as_forged(bounded: httpx.AsyncClient) -> None:
    inner = {"filter": {"resource": {"id": ["r"] * 11}}, "count": 100, "page_size": 10, "offset": 10}
    token = base64.b64encode(base64.b64encode(orjson.dumps(inner))).decode()
    response = await bounded.get("/events/filter/next", params={"page-token": token})
    assert response.status_code == 403
    assert response.json()["code"] == "invalid_page_token"


async def test_a_subscriber_beyond_the_bounds_is_closed_with_1008(storage: Storage, tmp_path: Path) -> None:
    async with (
        served_app(storage, tmp_path, **BOUNDS) as served,
        subscribed(served, {"resource": {"id": [f"r.{i}" for i in range(11)]}}) as ws,
    ):
        assert await closed_with(ws) == (1008, "Filter too large: resource.id has 11 values; the limit is 10")
        assert served.app.state.broker.subscribers == 0


# --- event queries: planned in linear time, stopped at a deadline, on a pool of their own (defect 3)

BOUND = 30.0  # seconds: a bound on a broken server, never an expectation

#: A query that never ends by itself: only the deadline or a close stops it.
ENDLESS = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(3600)",
}


def test_many_related_filters_make_one_subquery() -> None:
    """One semi-join per related filter made PostgreSQL's planner search every join order: 160
    filters took 5.3 s to plan, 320 took 83 s (a pool connection held all along). Now one pass
    over the related rows, grouped by event, serves them all."""
    event_filter = EventFilter.model_validate({"related": [{"id": [f"r.{i}"]} for i in range(100)]})
    for dialect in ("sqlite", "postgresql"):
        where, _ = filters.compile(event_filter, dialect)
        assert where.count("FROM event_resources") == 1


async def test_the_most_related_filters_the_settings_allow_are_served(
    storage: Storage, settings: Settings
) -> None:
    """At the largest bound a setting may give (100; SQLite once answered 999 entries with a
    misleading 503), the answer is right on both backends."""
    # (The retention job must not delete these events, dated before the fake clock's now.)
    update = {"events_filter_max_resource_filters": 100, "events_retention_seconds": 1e12}
    app = create_app(settings.model_copy(update=update), storage=storage)
    related = [{"prefect.resource.id": f"r.{i}", "prefect.resource.role": "x"} for i in range(100)]
    both = {"occurred": "2026-01-01T00:00:00Z", "event": "all", "id": str(uuid.uuid4())}
    some = {"occurred": "2026-01-01T00:00:00Z", "event": "some", "id": str(uuid.uuid4())}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            resource = {"prefect.resource.id": "p"}
            batch = [
                {**both, "resource": resource, "related": related},
                {**some, "resource": resource, "related": related[:99]},
            ]
            assert (await http.post("/events", json=batch)).status_code == 204
            event_filter = {
                "occurred": {"since": "2025-12-31T00:00:00Z", "until": "2026-01-02T00:00:00Z"},
                "related": [{"id": [f"r.{i}"], "role": ["x"]} for i in range(100)],
            }
            response = await http.post("/events/filter", json={"filter": event_filter})
            assert response.status_code == 200, response.text
            assert [e["event"] for e in response.json()["events"]] == ["all"]


async def test_an_event_query_past_its_deadline_is_a_504(
    storage: Storage, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.backend.query_timeout = 0.2  # type: ignore[attr-defined]
    endless = f"({ENDLESS[storage.backend.name]}) IS NOT NULL"
    app = create_app(settings.model_copy(update={"events_retention_seconds": 1e12}), storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            # An event, so that the condition is evaluated on a row (before the patch: this
            # request queries nothing).
            event = {"occurred": "2027-01-15T00:00:00Z", "event": "e", "id": str(uuid.uuid4())}
            posted = await http.post("/events", json=[{**event, "resource": {"prefect.resource.id": "r"}}])
            assert posted.status_code == 204
            monkeypatch.setattr(filters, "compile", lambda event_filter, dialect: (endless, {}))
            for path in ("/events/filter", "/events/count-by/event"):
                response = await asyncio.wait_for(http.post(path, json={"filter": {}}), BOUND)
                assert response.status_code == 504, response.text
                assert response.json()["code"] == "query_timeout"
            # The events pool is free again: the next query is served.
            monkeypatch.undo()
            assert (await http.post("/events/filter", json={})).status_code == 200


async def _saturate(storage: Storage) -> tuple[list[asyncio.Future[Any]], threading.Semaphore]:
    """Endless event queries on every connection of the events pool, and more queued."""
    running = threading.Semaphore(0)
    sql = ENDLESS[storage.backend.name]

    def endless(tx: Tx) -> Any:
        running.release()
        return tx.one(sql)

    size: int = storage.backend.events_pool_size  # type: ignore[attr-defined]
    scans = [asyncio.ensure_future(transactions.scan(storage.backend, endless)) for _ in range(size + 2)]
    for _ in range(size):
        assert await asyncio.to_thread(running.acquire, timeout=BOUND), "the event queries never started"
    return scans, running


async def test_an_acquire_is_served_while_event_queries_fill_their_pool(database_url: str) -> None:
    """Eight slow event queries held PostgreSQL's whole pool (an acquire waited 20.9 s). Event
    queries have a pool of their own: the acquire and release complete while every one of them
    still runs (no timing: they never end by themselves)."""
    storage = open_storage(database_url, events_pool_size=2)
    try:
        await storage.create_limit(LimitSpec("db", 1))
        scans, _ = await _saturate(storage)
        granted = await asyncio.wait_for(take(storage, "db"), BOUND)
        assert await asyncio.wait_for(storage.release_lease(str(granted.lease_id)), BOUND)
        assert not any(scan.done() for scan in scans)
    finally:
        await asyncio.wait_for(storage.close(), BOUND)  # does not wait for the endless queries
    outcomes = await asyncio.gather(*scans, return_exceptions=True)
    assert all(isinstance(o, StorageClosed | asyncio.CancelledError) for o in outcomes), outcomes


async def test_a_close_stops_the_event_queries_that_run(database_url: str) -> None:
    """A filter with 1M prefixes kept a SQLite reader busy for 8 minutes and blocked shutdown."""
    storage = open_storage(database_url, events_pool_size=1)
    scans, _ = await _saturate(storage)
    await asyncio.wait_for(storage.close(), BOUND)
    outcomes = await asyncio.gather(*scans, return_exceptions=True)
    assert isinstance(outcomes[0], StorageClosed), outcomes
    assert all(isinstance(o, StorageClosed | asyncio.CancelledError) for o in outcomes), outcomes
    with pytest.raises(StorageClosed):
        await transactions.scan(storage.backend, lambda tx: tx.one("SELECT 1"))


# --- background loops never die silently (defect 12) -------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_notification_that_cannot_be_read_is_skipped_and_the_listener_goes_on(
    storage: Storage, database_url: str
) -> None:
    """One event dated before year 1000 killed the listener thread for good: no live events, no
    wake-ups between processes. A payload that cannot be read is now logged and skipped."""
    collected = Collected()
    unsubscribe = storage.backend.subscribe(collected)
    try:
        old = record().wire() | {"occurred": "999-06-15T12:30:01.000000Z"}
        with psycopg.connect(database_url, autocommit=True) as conn:
            for payload in ("not json", orjson.dumps({"events": [old], "woken": []}).decode(), "{}"):
                conn.execute("SELECT pg_notify('slotkeeper_events', %s)", [payload])
        after = record()
        await storage.backend.run(writer([after]))
        assert await collected.until(1) == [after]
        assert None not in collected.commits  # skipped, not restarted: nothing was missed
        assert storage.supervisor.problems() == {}
    finally:
        unsubscribe()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_listener_that_dies_is_restarted_and_says_events_may_be_missed(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: Any = storage.backend
    deliver = backend._deliver
    crashed: list[bool] = []

    def crash_once(commit: Any) -> None:
        if commit is not None and not crashed:
            crashed.append(True)
            raise RuntimeError("a subscriber's bug")
        deliver(commit)

    monkeypatch.setattr(backend, "_deliver", crash_once)
    storage.supervisor.max_failures = 1
    collected = Collected()
    unsubscribe = storage.backend.subscribe(collected)
    try:
        await storage.backend.run(writer([record()]))  # its delivery kills the listener
        later = record()
        for _ in range(int(BOUND / 0.01)):  # until the listener is back (it says so with None)
            if None in collected.commits:
                break
            await asyncio.sleep(0.01)
        assert collected.commits[0] is None
        await storage.backend.run(writer([later]))
        assert await collected.until(1) == [later]
        assert storage.supervisor.problems() == {"event listener": 1}
    finally:
        unsubscribe()


async def test_ready_fails_while_the_reaper_keeps_failing(
    storage: Storage, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper failed every pass forever with nothing but tracebacks to show for it: now each
    failure is counted, the passes back off, and readiness fails until they stop failing."""

    async def broken(batch: int = 500) -> int:
        raise RuntimeError("the reaper's database is broken")

    monkeypatch.setattr(storage, "reap_expired", broken)
    app = create_app(settings.model_copy(update={"background_max_failures": 3}), storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            deadline = time.monotonic() + BOUND
            while (response := await http.get("/ready")).status_code == 200:
                assert time.monotonic() < deadline, "readiness never failed"
                await asyncio.sleep(0.05)
            assert response.status_code == 503
            body = response.json()
            assert body["code"] == "not_ready"
            assert body["failing"]["reaper"] >= 3
            assert "reaper" in body["detail"]
            assert (await http.get("/health")).status_code == 200  # alive, not ready
            # Repaired: once the failures leave the window, it is ready again.
            monkeypatch.undo()
            storage.supervisor.window = 0.001
            while (response := await http.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, "readiness never came back"
                await asyncio.sleep(0.05)
            assert response.json() == {"message": "OK"}


async def test_a_backfill_past_its_deadline_closes_the_subscriber_with_1008(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.backend.query_timeout = 0.2  # type: ignore[attr-defined]
    async with served_app(storage, tmp_path) as served:
        await served.post("/events", [client_event()], 204)  # a row for the condition to run on
        endless = f"({ENDLESS[storage.backend.name]}) IS NOT NULL"
        monkeypatch.setattr(filters, "compile", lambda event_filter, dialect: (endless, {}))
        async with subscribed(served, backfill=True) as ws:
            code, reason = await closed_with(ws)
        assert code == 1008
        assert (
            reason
            == "The events query ran longer than 0.2 s and was stopped; narrow the filter (its occurred range first)"
        )


async def test_a_failing_waiter_heartbeat_is_logged_and_counted(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat of this process's waiters swallowed every error without a word."""
    monkeypatch.setattr(waiting, "WAITER_HEARTBEAT_SECONDS", 0.01)
    await storage.create_limit(LimitSpec("db", 1))
    held = await take(storage, "db")
    queue: Any = storage.scripts.queue  # type: ignore[attr-defined]

    def broken(tx: Tx) -> None:
        raise RuntimeError("the heartbeat's database is broken")

    monkeypatch.setattr(queue, "touch", broken)
    storage.supervisor.max_failures = 1
    waiter = asyncio.ensure_future(
        storage.acquire(AcquireRequest(["db"], 1, lease=LeaseSpec(60.0), wait=BOUND))
    )
    deadline = time.monotonic() + BOUND
    while waiting.HEARTBEAT not in storage.supervisor.problems():
        assert time.monotonic() < deadline, "the heartbeat's failure was never reported"
        await asyncio.sleep(0.01)
    await storage.release_lease(str(held.lease_id))
    assert (await asyncio.wait_for(waiter, BOUND)).lease_id is not None
