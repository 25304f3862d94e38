"""The event websockets ``/api/events/in`` and ``/api/events/out`` over real connections.

The app is served by uvicorn on a free local port in this process (over the ``storage`` fixture,
so every test runs on SQLite and PostgreSQL) and reached with aiohttp's websocket client, as
Prefect's client would. The last test starts two ``slotkeeper server start`` processes on one
PostgreSQL database: a subscriber on one sees what the other commits.

Nothing is timed: every wait is bounded (``BOUND`` seconds) only so that a broken server fails
the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from slotkeeper.api.app import create_app
from slotkeeper.events import builders
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import ServerProcess, serving

BOUND = 30.0  # seconds: a bound on a broken server, never an expectation
AUTH = "admin:s3cret"
TASK_ID = "7b1e3c55-8a2d-4f0e-b6a1-3c9d2e4f5a60"
TASK_RUN = {"prefect.resource.id": f"prefect.task-run.{TASK_ID}", "prefect.resource.role": "task-run"}
LEASES = "/v2/concurrency_limits/increment-with-lease"
RELEASE = "/v2/concurrency_limits/decrement-with-lease"


# --- serving the app ------------------------------------------------------------------------------


@dataclass
class Served:
    """The app served over HTTP, and an HTTP session on it."""

    app: Any  # the FastAPI app when served in this process (None for a server process)
    url: str  # http://127.0.0.1:PORT/api
    http: aiohttp.ClientSession

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    async def post(self, path: str, body: Any, status: int = 200) -> Any:
        async with self.http.post(self.url + path, json=body) as response:
            text = await response.text()
            assert response.status == status, text
            return json.loads(text) if text else None

    async def create(self, name: str, limit: int = 5) -> str:
        created = await self.post("/v2/concurrency_limits/", {"name": name, "limit": limit}, 201)
        limit_id: str = created["id"]
        return limit_id

    async def acquire(self, names: list[str], slots: int = 1, holder: bool = False) -> str:
        body: dict[str, Any] = {"names": names, "slots": slots, "lease_duration": 300}
        if holder:
            body["holder"] = {"type": "task_run", "id": TASK_ID}
        lease_id: str = (await self.post(LEASES, body))["lease_id"]
        return lease_id

    async def release(self, lease_id: str) -> None:
        await self.post(RELEASE, {"lease_id": lease_id}, 204)

    async def stored(self, **criteria: Any) -> list[dict[str, Any]]:
        """Every stored event (ASC) as ``POST /api/events/filter`` serves it."""
        now = datetime.now(UTC)
        body = {
            "filter": {
                "occurred": {
                    "since": _iso(now - timedelta(hours=1)),
                    "until": _iso(now + timedelta(hours=1)),
                },
                "order": "ASC",
                **criteria,
            },
            "limit": 50,
        }
        page = await self.post("/events/filter", body)
        events: list[dict[str, Any]] = page["events"]
        while page["next_page"]:
            async with self.http.get(page["next_page"]) as response:
                assert response.status == 200
                page = await response.json()
            events.extend(page["events"])
        return events


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@contextlib.asynccontextmanager
async def served_app(storage: Storage, tmp_path: Path, **settings: Any) -> AsyncIterator[Served]:
    # Real time: the websocket clamps its backfill with the wall clock, as Prefect does.
    storage.clock = time.time
    app = create_app(Settings(home=tmp_path, **settings), storage=storage)
    # Websockets as ``slotkeeper server start`` has them.
    async with serving(app, ws="auto") as url, aiohttp.ClientSession() as http:
        yield Served(app, url, http)


@pytest.fixture
async def served(storage: Storage, tmp_path: Path) -> AsyncIterator[Served]:
    """The real app without auth, over each storage backend."""
    async with served_app(storage, tmp_path) as s:
        yield s


# --- websocket helpers ------------------------------------------------------------------------------


async def receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await asyncio.wait_for(ws.receive(), BOUND)


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """Read until the server closes; return its close code and reason."""
    while True:
        msg = await receive(ws)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return msg.data, msg.extra
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.CLOSING), msg
        if msg.type == aiohttp.WSMsgType.CLOSING:
            return ws.close_code, ""


async def authenticate(ws: aiohttp.ClientWebSocketResponse, token: str | None = None) -> None:
    await ws.send_json({"type": "auth", "token": token})
    msg = await receive(ws)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    assert json.loads(msg.data) == {"type": "auth_success"}


@contextlib.asynccontextmanager
async def subscribed(
    served: Served, event_filter: dict[str, Any] | None = None, *, backfill: bool = False
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """An authenticated ``/events/out`` subscriber that sent its filter."""
    async with served.http.ws_connect(served.ws_url + "/events/out", protocols=["prefect"]) as ws:
        await authenticate(ws)
        await ws.send_json({"type": "filter", "filter": event_filter or {}, "backfill": backfill})
        yield ws


async def next_event(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await receive(ws)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg, ws.close_code)
    frame = json.loads(msg.data)
    assert frame["type"] == "event"
    event: dict[str, Any] = frame["event"]
    return event


async def events_until(ws: aiohttp.ClientWebSocketResponse, last_id: str) -> list[dict[str, Any]]:
    """Every event frame up to and including the one with ``last_id``."""
    events = [await next_event(ws)]
    while events[-1]["id"] != last_id:
        events.append(await next_event(ws))
    return events


def client_event(
    name: str = "test.happened", resource: str = "test.resource", **extra: Any
) -> dict[str, Any]:
    return {
        "occurred": _iso(datetime.now(UTC)),
        "event": name,
        "resource": {"prefect.resource.id": resource},
        "id": str(uuid.uuid4()),
        **extra,
    }


async def wait_until_subscribed(served: Served, count: int) -> None:
    """Until the broker has ``count`` subscribers (the filter message has been handled)."""
    for _ in range(int(BOUND / 0.005)):
        if served.app.state.broker.subscribers >= count:
            return
        await asyncio.sleep(0.005)
    pytest.fail("the subscription never started")


# --- handshake --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/events/out", "/events/in"])
@pytest.mark.parametrize("token", [None, "anything"])
async def test_auth_success_without_configured_auth(served: Served, path: str, token: str | None) -> None:
    async with served.http.ws_connect(served.ws_url + path, protocols=["prefect"]) as ws:
        assert ws.protocol == "prefect"
        await authenticate(ws, token)  # any token, null included, when no auth is configured


@pytest.mark.parametrize("path", ["/events/out", "/events/in"])
@pytest.mark.parametrize("first", [{"type": "filter", "filter": {}}, {"token": "x"}, ["auth"], "not json"])
async def test_the_first_message_must_be_auth(served: Served, path: str, first: Any) -> None:
    async with served.http.ws_connect(served.ws_url + path, protocols=["prefect"]) as ws:
        if isinstance(first, str):
            await ws.send_str(first)
        else:
            await ws.send_json(first)
        assert await closed_with(ws) == (1008, "Expected 'auth' message")


async def test_a_web_page_of_another_site_cannot_send_events(served: Served) -> None:
    """Browsers send Origin on every websocket upgrade (CORS does not apply there): a page of
    another site may not write events; Prefect's client sends no Origin and is unaffected."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.http.ws_connect(
            served.ws_url + "/events/in", protocols=["prefect"], headers={"Origin": "https://evil.example"}
        )
    assert refused.value.status == 403
    own = "http://" + served.ws_url.split("://", 1)[1].split("/", 1)[0]
    async with served.http.ws_connect(
        served.ws_url + "/events/in", protocols=["prefect"], headers={"Origin": own}
    ) as ws:
        await authenticate(ws, None)


@pytest.fixture
async def served_with_auth(storage: Storage, tmp_path: Path) -> AsyncIterator[Served]:
    async with served_app(storage, tmp_path, api_auth_string=AUTH) as s:
        yield s


@pytest.mark.parametrize("path", ["/events/out", "/events/in"])
@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "auth"}, "Auth required but no token provided"),
        ({"type": "auth", "token": None}, "Auth required but no token provided"),
        ({"type": "auth", "token": ""}, "Auth required but no token provided"),
        ({"type": "auth", "token": "admin:wrong"}, "Invalid token"),
        ({"type": "auth", "token": AUTH + "x"}, "Invalid token"),
        ({"type": "auth", "token": 42}, "Invalid token"),
    ],
)
async def test_configured_auth_refuses_a_missing_or_wrong_token(
    served_with_auth: Served, path: str, message: dict[str, Any], reason: str
) -> None:
    async with served_with_auth.http.ws_connect(served_with_auth.ws_url + path, protocols=["prefect"]) as ws:
        await ws.send_json(message)
        assert await closed_with(ws) == (1008, reason)


async def test_configured_auth_accepts_the_right_token(served_with_auth: Served) -> None:
    served = served_with_auth
    async with served.http.ws_connect(served.ws_url + "/events/out", protocols=["prefect"]) as ws:
        await authenticate(ws, AUTH)
        await ws.send_json(
            {"type": "filter", "filter": {"event": {"name": ["auth.test"]}}, "backfill": False}
        )
        await wait_until_subscribed(served, 1)
        async with served.http.ws_connect(served.ws_url + "/events/in", protocols=["prefect"]) as sender:
            await authenticate(sender, AUTH)
            sent = client_event("auth.test")
            await sender.send_json(sent)
            assert (await next_event(ws))["id"] == sent["id"]


@pytest.mark.parametrize("path", ["/events/out", "/events/in"])
async def test_configured_auth_refuses_a_client_without_the_subprotocol(
    served_with_auth: Served, path: str
) -> None:
    # The server closes before accepting (code 1002, as Prefect); an ASGI server answers a close
    # during the handshake with HTTP 403, so that is what a client sees on the wire.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with served_with_auth.http.ws_connect(served_with_auth.ws_url + path):
            pass
    assert refused.value.status == 403


@pytest.mark.parametrize("path", ["/api/events/out", "/api/events/in"])
def test_the_refusal_without_the_subprotocol_is_close_code_1002(tmp_path: Path, path: str) -> None:
    """The code itself, seen at the ASGI level (Starlette's test client reports it)."""
    app = create_app(Settings(home=tmp_path, api_auth_string=AUTH))
    with (
        TestClient(app) as http,
        pytest.raises(WebSocketDisconnect) as closed,
        http.websocket_connect(path),
    ):
        pass
    assert closed.value.code == 1002


async def test_legacy_mode_without_the_subprotocol_when_no_auth(served: Served) -> None:
    async with served.http.ws_connect(served.ws_url + "/events/out") as out:
        assert out.protocol is None
        # No handshake messages: the first message is the filter.
        await out.send_json(
            {"type": "filter", "filter": {"event": {"name": ["legacy.test"]}}, "backfill": False}
        )
        await wait_until_subscribed(served, 1)
        async with served.http.ws_connect(served.ws_url + "/events/in") as sender:
            sent = client_event("legacy.test")
            await sender.send_json(sent)
            event = await next_event(out)
    assert event["id"] == sent["id"]
    assert [e["id"] for e in await served.stored(event={"name": ["legacy.test"]})] == [sent["id"]]


# --- the filter message -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"type": "auth", "token": None},
        {"type": "subscribe", "filter": {}},
        {"filter": {}},
        ["filter"],
        "not json",
    ],
)
async def test_the_second_message_must_be_a_filter(served: Served, message: Any) -> None:
    async with served.http.ws_connect(served.ws_url + "/events/out", protocols=["prefect"]) as ws:
        await authenticate(ws)
        if isinstance(message, str):
            await ws.send_str(message)
        else:
            await ws.send_json(message)
        assert await closed_with(ws) == (1002, "Expected 'filter' message")


@pytest.mark.parametrize(
    "event_filter",
    [
        {"bogus": 1},
        {"order": "SIDEWAYS"},
        {"occurred": {"since": "yesterday"}},
        {"text": {"query": "x" * 201}},
        {"id": {"id": ["not-a-uuid"]}},
        {"related": {"role": "not a list"}},
    ],
)
async def test_an_invalid_filter_closes_with_1002(served: Served, event_filter: dict[str, Any]) -> None:
    async with served.http.ws_connect(served.ws_url + "/events/out", protocols=["prefect"]) as ws:
        await authenticate(ws)
        await ws.send_json({"type": "filter", "filter": event_filter})
        code, reason = await closed_with(ws)
    assert code == 1002
    assert reason.startswith("Invalid filter: ")
    assert len(reason.encode()) <= 123
    assert served.app.state.broker.subscribers == 0


# --- backfill and live delivery -----------------------------------------------------------------------


@pytest.mark.parametrize("backfill", [True, False])
async def test_backfill_then_live_each_event_once(served: Served, backfill: bool) -> None:
    await served.create("a")
    await served.create("b")
    before = await served.stored()
    assert [e["event"] for e in before] == [builders.CREATED] * 2
    async with subscribed(served, backfill=backfill) as ws:
        await wait_until_subscribed(served, 1)
        if backfill:  # the stored events first, in occurred order, exactly as stored
            assert [await next_event(ws) for _ in before] == before
        # Then live: every change, in commit order (the requests are sequential).
        groups = []
        seen = {e["id"] for e in before}

        async def step() -> None:
            current = await served.stored()
            groups.append([e for e in current if e["id"] not in seen])
            seen.update(e["id"] for e in current)

        lease = await served.acquire(["b", "a"], 2, holder=True)
        await step()
        await served.post("/v2/concurrency_limits/increment", {"names": ["a"], "slots": 1})
        await step()
        await served.release(lease)
        await step()
        await served.post("/v2/concurrency_limits/decrement", {"names": ["a"], "slots": 1})
        await step()
        await served.post("/events", [client_event(), client_event()], 204)
        await step()
        async with served.http.patch(served.url + "/v2/concurrency_limits/b", json={"limit": 9}) as response:
            assert response.status == 204
        await step()
        await served.post(LEASES, {"names": ["a"], "slots": 9}, 422)  # over the limit
        await step()  # refused: nothing
        async with served.http.delete(served.url + "/v2/concurrency_limits/a") as response:
            assert response.status == 204
        await step()

        assert [len(g) for g in groups] == [2, 1, 2, 1, 2, 1, 0, 1]
        live = await events_until(ws, groups[-1][-1]["id"])
        # Each event once, with the JSON the REST API serves, group after group in commit order.
        assert len(live) == sum(len(g) for g in groups)
        offset = 0
        for group in groups:
            received = live[offset : offset + len(group)]
            offset += len(group)
            assert sorted(received, key=lambda e: e["id"]) == sorted(group, key=lambda e: e["id"])
        assert [e["event"] for e in live][:3] == [builders.ACQUIRED, builders.ACQUIRED, builders.ACQUIRED]
    assert not {e["id"] for e in live} & {e["id"] for e in before}


async def test_an_event_committed_during_the_backfill_is_sent_once(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscription starts before the backfill is read, so an event that commits in between
    and occurred before the backfill's end is in both; the client must get it once. The window
    is forced open (a commit just before the first backfill query), not raced."""
    await served.create("db")
    store = served.app.state.events
    query = store.query
    late = client_event("late.commit", occurred=_iso(datetime.now(UTC) - timedelta(seconds=1)))

    fired: list[bool] = []

    async def query_after_a_commit(*args: Any, **kwargs: Any) -> Any:
        if not fired:  # the first query after the patch is the subscriber's backfill
            fired.append(True)
            await served.post("/events", [late], 204)  # live (after subscribe) and backfilled
        return await query(*args, **kwargs)

    monkeypatch.setattr(store, "query", query_after_a_commit)
    async with subscribed(served, backfill=True) as ws:
        backfilled = [await next_event(ws), await next_event(ws)]
        assert sorted(e["event"] for e in backfilled) == sorted([builders.CREATED, "late.commit"])
        lease = await served.acquire(["db"])
        after = await next_event(ws)  # the live copy of the late event was skipped
    assert after["event"] == builders.ACQUIRED
    assert lease and fired
    assert len(await served.stored(event={"name": ["late.commit"]})) == 1


async def test_related_filters_apply_to_the_live_stream(served: Served) -> None:
    a = await served.create("a")
    await served.create("b")
    by_holder = {"related": {"role": ["task-run"]}}
    with_a = {"related": {"resources_in_roles": [[f"prefect.concurrency-limit.{a}", "concurrency-limit"]]}}
    both = {"related": [{"role": ["task-run"]}, {"id": [f"prefect.concurrency-limit.{a}"]}]}
    async with (
        subscribed(served, by_holder) as holder_ws,
        subscribed(served, with_a) as a_ws,
        subscribed(served, both) as both_ws,
    ):
        await wait_until_subscribed(served, 3)
        await served.release(await served.acquire(["a"], holder=True))  # holder, a alone
        await served.release(await served.acquire(["b", "a"]))  # a and b, no holder
        await served.release(await served.acquire(["a", "b"], holder=True))  # both
        barrier = client_event(
            "barrier",
            related=[
                TASK_RUN,
                {
                    "prefect.resource.id": f"prefect.concurrency-limit.{a}",
                    "prefect.resource.role": "concurrency-limit",
                },
            ],
        )
        await served.post("/events", [barrier], 204)
        stored = await served.stored()
        selected = {
            "holder": await served.stored(**by_holder),
            "a": await served.stored(**with_a),
            "both": await served.stored(**both),
        }
        received = {
            "holder": await events_until(holder_ws, barrier["id"]),
            "a": await events_until(a_ws, barrier["id"]),
            "both": await events_until(both_ws, barrier["id"]),
        }

    def related(event: dict[str, Any]) -> list[tuple[str, str]]:
        return [(r["prefect.resource.id"], r["prefect.resource.role"]) for r in event["related"]]

    limit_a = (f"prefect.concurrency-limit.{a}", "concurrency-limit")
    expected = {
        "holder": [e for e in stored if any(role == "task-run" for _, role in related(e))],
        "a": [e for e in stored if limit_a in related(e)],
        "both": [
            e
            for e in stored
            if limit_a in related(e) and ("prefect.task-run." + TASK_ID, "task-run") in related(e)
        ],
    }
    assert [len(v) for v in expected.values()] == [7, 5, 3]  # the filters differ, as meant
    for key, events in received.items():
        # Exactly the events the store's SQL selects for the same filter, each once.
        assert sorted(e["id"] for e in events) == sorted(e["id"] for e in expected[key]), key
        assert sorted(e["id"] for e in selected[key]) == sorted(e["id"] for e in expected[key]), key


# --- a slow subscriber ------------------------------------------------------------------------------


async def test_a_subscriber_that_falls_behind_is_cut_off_with_1013(storage: Storage, tmp_path: Path) -> None:
    async with served_app(storage, tmp_path, events_subscriber_queue_size=3) as served:
        async with subscribed(served) as slow, subscribed(served, {"event": {"name": ["wanted"]}}) as other:
            await wait_until_subscribed(served, 2)
            # The slow subscriber reads nothing while one commit brings more than its queue holds
            # (one batch is handed to the broker at once, so this does not depend on timing).
            batch = [client_event(f"flood.{i}") for i in range(10)] + [client_event("wanted")]
            await served.post("/events", batch, 204)
            frames = []
            while True:
                msg = await receive(slow)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frames.append(json.loads(msg.data)["event"]["id"])
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1013, "Subscriber too slow: more than 3 events queued")
            assert frames == [e["id"] for e in batch[:3]]  # what it had queued, in order
            assert served.app.state.broker.overflows == 1
            # Only the slow one is cut off: the other subscriber still gets its event, and more.
            assert (await next_event(other))["id"] == batch[-1]["id"]
            later = client_event("wanted")
            await served.post("/events", [later], 204)
            assert (await next_event(other))["id"] == later["id"]
            assert served.app.state.broker.subscribers == 1
        # The acquisitions never waited for the slow reader, and every event was stored.
        assert len(await served.stored(event={"prefix": ["flood."]})) == 10


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_lost_listen_connection_closes_subscribers_with_1013(served: Served) -> None:
    """Notifications sent while the listener reconnects are lost: subscribers are told to
    subscribe again (and backfill) instead of silently missing events."""
    async with subscribed(served) as ws:
        await wait_until_subscribed(served, 1)
        conninfo = served.app.state.storage.backend.conninfo
        with psycopg.connect(conninfo, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            ).fetchall()
        assert killed
        assert await closed_with(ws) == (1013, "Event stream interrupted; subscribe again to backfill")
    # The listener is back: a new subscriber gets live events again.
    async with subscribed(served) as ws:
        await wait_until_subscribed(served, 1)
        sent = client_event("after.reconnect")
        await served.post("/events", [sent], 204)
        assert (await next_event(ws))["id"] == sent["id"]


# --- /events/in -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "Invalid event: "),
        (
            json.dumps({"event": "no.id", "occurred": "2026-01-01T00:00:00Z"}),
            "Invalid event: resource: Field required",
        ),
        (json.dumps(client_event(resource="")), "Invalid event: resource: "),
        (
            json.dumps({**client_event(), "resource": {"prefect.resource.id": "r", "n": 1}}),
            "Invalid event: resource.n: ",
        ),
        (
            json.dumps(client_event("nul\x00name")),
            "Invalid event: Event names, label names and label values must not contain NUL",
        ),
        (
            json.dumps({**client_event(), "payload": {"big": 2**70}}),
            "Invalid event: The event cannot be stored as JSON",
        ),
    ],
)
async def test_an_invalid_event_closes_with_1007_and_the_server_keeps_serving(
    served: Served, frame: str, reason: str
) -> None:
    async with served.http.ws_connect(served.ws_url + "/events/in", protocols=["prefect"]) as ws:
        await authenticate(ws)
        first = client_event("before.the.bad.one")
        await ws.send_json(first)
        await ws.send_str(frame)
        code, text = await closed_with(ws)
    assert code == 1007
    assert text.startswith(reason), text
    # Still serving: a new connection ingests, and what came before the bad frame was stored.
    async with served.http.ws_connect(served.ws_url + "/events/in", protocols=["prefect"]) as ws:
        await authenticate(ws)
        after = client_event("after.the.bad.one")
        await ws.send_json(after)
        for _ in range(int(BOUND / 0.01)):  # bounded: the frame is ingested asynchronously
            names = [e["event"] for e in await served.stored(event={"prefix": ["before.", "after."]})]
            if "after.the.bad.one" in names:
                break
            await asyncio.sleep(0.01)
    assert names == ["before.the.bad.one", "after.the.bad.one"]


async def test_client_copies_of_slot_events_are_not_stored_twice(served: Served) -> None:
    db = await served.create("db")
    lease = await served.acquire(["db"], holder=True)
    await served.release(lease)
    (acquired,) = await served.stored(event={"name": [builders.ACQUIRED]})
    async with served.http.ws_connect(served.ws_url + "/events/in", protocols=["prefect"]) as ws:
        await authenticate(ws)
        # What Prefect's client sends around a concurrency() block: its own ids and times.
        resource = dict(acquired["resource"])
        for name in sorted(builders.SLOT_EVENTS):
            await ws.send_json({**client_event(name), "resource": resource, "related": [TASK_RUN]})
        duplicate = client_event("custom.event")
        await ws.send_json(duplicate)
        await ws.send_json(duplicate)  # the same id twice: stored once
        barrier = client_event("barrier")
        await ws.send_json(barrier)
        for _ in range(int(BOUND / 0.01)):  # frames are handled in order: the barrier comes last
            if await served.stored(event={"name": ["barrier"]}):
                break
            await asyncio.sleep(0.01)
    slot_events = await served.stored(resource={"id": [f"prefect.concurrency-limit.{db}"]})
    assert [e["event"] for e in slot_events] == [builders.CREATED, builders.ACQUIRED, builders.RELEASED]
    assert served.app.state.events.dropped_slot_copies == len(builders.SLOT_EVENTS)
    assert len(await served.stored(event={"name": ["custom.event"]})) == 1


# --- two server processes on PostgreSQL --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_subscriber_on_one_process_sees_what_another_commits(
    private_postgres_url: str, tmp_path: Path
) -> None:
    # A database of their own (tests/conftest.py): other tests' truncations never meet these servers.
    with (
        ServerProcess(tmp_path / "a", SLOTKEEPER_DATABASE_URL=private_postgres_url) as server_a,
        ServerProcess(tmp_path / "b", SLOTKEEPER_DATABASE_URL=private_postgres_url) as server_b,
    ):
        url_a, url_b = server_a.url, server_b.url
        async with aiohttp.ClientSession() as http:
            a, b = Served(None, url_a, http), Served(None, url_b, http)
            ws_url = "ws" + url_a.removeprefix("http") + "/events/out"
            probe = client_event("probe")
            await a.post("/events", [probe], 204)
            async with http.ws_connect(ws_url, protocols=["prefect"]) as out:
                await authenticate(out)
                # The subscription is registered before the backfill is read: once the probe
                # stored beforehand arrives, everything committed from now on will too.
                await out.send_json({"type": "filter", "filter": {}, "backfill": True})
                assert (await next_event(out))["id"] == probe["id"]
                # Everything below commits on B.
                await b.create("db", 2)
                lease = await b.acquire(["db"], 2, holder=True)
                await b.post(LEASES, {"names": ["db"], "slots": 1, "lease_duration": 60}, 423)
                await b.release(lease)
                async with http.ws_connect(
                    "ws" + url_b.removeprefix("http") + "/events/in", protocols=["prefect"]
                ) as sender:
                    await authenticate(sender)
                    last = client_event("from.b")
                    await sender.send_json(last)
                    received = await events_until(out, last["id"])
            stored_on_a = await a.stored(event={"prefix": ["prefect.concurrency-limit.", "from.b"]})
    # A saw B's commits, in commit order, each once, exactly as stored.
    assert [e["event"] for e in received] == [
        builders.CREATED,
        builders.ACQUIRED,
        builders.RELEASED,
        "from.b",
    ]
    assert received == stored_on_a
    assert received[2]["follows"] == received[1]["id"]
