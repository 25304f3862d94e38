"""The session endpoint ``/api/slotkeeper/session`` (:mod:`slotkeeper.api.session`), on both backends.

The app is served by uvicorn on a free port in this process over the ``storage`` fixture (SQLite
and PostgreSQL) and spoken to with aiohttp's websocket client, record by record, so these tests
pin the protocol itself (:mod:`slotkeeper.session`), not the SDK's client of it. What they show:
a session answers each request exactly as HTTP answers it; many requests share a message; a
cancelled request is withdrawn; a session that ends releases what its client never acknowledged
and nothing else, and a server shutdown keeps what it sent; auth, the subprotocol and every bound
are enforced.

Nothing is timed: every wait is bounded (``BOUND`` seconds) only so that a broken server fails
the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn

from slotkeeper import session as protocol
from slotkeeper.api import session as endpoint
from slotkeeper.api.app import create_app
from slotkeeper.api.server import Server
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import serving

BOUND = 30.0  # seconds: a bound on a broken server, never an expectation
AUTH = "admin:s3cret"
V2 = "/v2/concurrency_limits"
ACQUIRE = f"{V2}/increment-with-lease"
RELEASE = f"{V2}/decrement-with-lease"


def renew_path(lease_id: str) -> str:
    return f"{V2}/leases/{lease_id}/renew"


@dataclass
class Answer:
    status: int
    retry_after: str | None
    body: Any


@dataclass
class Wire:
    """A session spoken record by record: requests out, answers (and confirmations) in."""

    ws: aiohttp.ClientWebSocketResponse
    next_id: int = 1
    received: int = 0  # messages read
    answers: dict[int, Answer] = field(default_factory=dict)
    confirmed: int = 0  # the last ACKED
    messages_with_answers: int = 0

    def request(self, path: str, body: Any) -> tuple[int, bytes]:
        """A REQUEST record (and its number), not sent yet."""
        ident = self.next_id
        self.next_id += 1
        payload = protocol.request_payload("POST", path, orjson.dumps(body))
        return ident, protocol.record(protocol.REQUEST, ident, payload)

    async def send(self, *records: bytes) -> None:
        await self.ws.send_bytes(b"".join(records))

    async def call(self, path: str, body: Any) -> Answer:
        ident, record = self.request(path, body)
        await self.send(record)
        return (await self.wait_for(ident))[ident]

    async def read(self) -> None:
        """Read one message; answers go to :attr:`answers`."""
        message = await asyncio.wait_for(self.ws.receive(), BOUND)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        self.received += 1
        answered = False
        for kind, ident, payload in protocol.records(message.data):
            if kind == protocol.ACKED:
                self.confirmed = ident
                continue
            assert kind == protocol.ANSWER, kind
            status, retry_after, body = protocol.parse_answer(payload)
            self.answers[ident] = Answer(status, retry_after, orjson.loads(body) if body else None)
            answered = True
        self.messages_with_answers += answered

    async def wait_for(self, *idents: int) -> dict[int, Answer]:
        while not all(i in self.answers for i in idents):
            await self.read()
        return {i: self.answers.pop(i) for i in idents}

    async def ack(self) -> None:
        """Acknowledge every message read so far, and wait for the server to confirm it."""
        count = self.received
        await self.send(protocol.record(protocol.ACK, count))
        while self.confirmed < count:
            await self.read()

    async def closed(self) -> int | None:
        """Read until the server closes the websocket; the close code it sent."""
        while True:
            message = await asyncio.wait_for(self.ws.receive(), BOUND)
            if message.type == aiohttp.WSMsgType.CLOSE:
                return int(message.data)
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code


@dataclass
class Served:
    url: str
    http: aiohttp.ClientSession
    storage: Storage
    auth: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        if not self.auth:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(self.auth.encode()).decode()}

    async def post(self, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        async with self.http.post(self.url + path, json=body, headers=self.headers) as response:
            raw = await response.read()
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, orjson.loads(raw) if raw else None, headers

    async def create(self, name: str, limit: int = 5) -> None:
        status, body, _ = await self.post(f"{V2}/", {"name": name, "limit": limit})
        assert status == 201, body

    @contextlib.asynccontextmanager
    async def session(self, **options: Any) -> AsyncIterator[Wire]:
        url = "ws" + self.url.removeprefix("http") + protocol.PATH
        options.setdefault("protocols", [protocol.SUBPROTOCOL])
        async with self.http.ws_connect(url, headers=self.headers, **options) as ws:
            yield Wire(ws)

    async def leases(self, name: str) -> list[str]:
        return [info.lease_id for info in await self.storage.list_leases(name)]

    async def queued(self) -> int:
        rows = await self.storage.backend.run(
            lambda tx: tx.all("SELECT id FROM waiters WHERE lease_id IS NULL")
        )
        return len(rows)

    async def until_queued(self, count: int) -> None:
        await self.until(lambda: _is(self.queued(), count), f"{count} request(s) queued")

    async def wait_in_queue(self, wire: Wire, name: str) -> int:
        """Send a request that waits for a slot of ``name`` (full); its number once it is queued."""
        ident, record = wire.request(ACQUIRE, acquisition(name, wait_seconds=60))
        await wire.send(record)
        await self.until_queued(1)
        return ident

    async def until(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + BOUND
        while not await condition():
            if time.monotonic() > deadline:
                pytest.fail(f"never happened: {what}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def served_app(storage: Storage, tmp_path: Path, **settings: Any) -> AsyncIterator[Served]:
    storage.clock = time.time  # real time: waits and leases as a server has them
    app = create_app(Settings(home=tmp_path, **settings), storage=storage)
    async with serving(app, ws="auto") as url, aiohttp.ClientSession() as http:
        yield Served(url, http, storage, settings.get("api_auth_string"))


@pytest.fixture
async def served(storage: Storage, tmp_path: Path) -> AsyncIterator[Served]:
    async with served_app(storage, tmp_path) as s:
        yield s


def acquisition(name: str, **extra: Any) -> dict[str, Any]:
    return {"names": [name], "slots": 1, "lease_duration": 300, **extra}


# --- requests and answers ------------------------------------------------------------------------


async def test_a_session_acquires_renews_and_releases_as_http_does(served: Served) -> None:
    await served.create("db", 2)
    async with served.session() as wire:
        granted = await wire.call(ACQUIRE, acquisition("db"))
        assert granted.status == 200
        lease_id = granted.body["lease_id"]
        (limit,) = granted.body["limits"]
        assert (limit["name"], limit["limit"], limit["fencing_token"]) == ("db", 2, 1)
        assert await served.leases("db") == [lease_id]
        assert (await wire.call(renew_path(lease_id), {"lease_duration": 600})).status == 204
        assert (await wire.call(RELEASE, {"lease_id": lease_id})).status == 204
    assert await served.leases("db") == []
    # The same requests over HTTP: the same statuses, and the next fencing token.
    status, body, _ = await served.post(ACQUIRE, acquisition("db"))
    assert status == 200 and body["limits"][0]["fencing_token"] == 2
    assert (await served.post(RELEASE, {"lease_id": body["lease_id"]}))[0] == 204
    # Both transports wrote their events, in the same transactions.
    events = await served.storage.backend.run(lambda tx: tx.all("SELECT event FROM events ORDER BY occurred"))
    slot_events = [e for (e,) in events if e.rsplit(".", 1)[-1] in ("acquired", "released")]
    assert slot_events == [
        "prefect.concurrency-limit.acquired",
        "prefect.concurrency-limit.released",
        "prefect.concurrency-limit.acquired",
        "prefect.concurrency-limit.released",
    ]


async def test_errors_are_the_http_answers(served: Served) -> None:
    await served.create("one", 1)
    holder = (await served.post(ACQUIRE, acquisition("one")))[1]["lease_id"]
    bad = {"names": ["one"], "slots": 0, "lease_duration": 300}
    cases = [
        (ACQUIRE, bad),  # 422, Prefect's shape
        (ACQUIRE, acquisition("one")),  # 423 and Retry-After
        (renew_path("0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e"), {"lease_duration": 300}),  # 410
        (renew_path("not-a-uuid"), {"lease_duration": 300}),  # 422 on the path
    ]
    async with served.session() as wire:
        for path, body in cases:
            over_session = await wire.call(path, body)
            status, http_body, headers = await served.post(path, body)
            assert over_session.status == status
            assert over_session.body == http_body
            assert (over_session.retry_after is None) == ("retry-after" not in headers)  # jittered
        assert over_session.status == 422
        # Only the lease routes are carried; anything else is sent over HTTP.
        for path in (f"{V2}/increment", f"{V2}/filter"):
            other = await wire.call(path, {"names": ["one"], "slots": 1})
            assert (other.status, other.body["code"]) == (404, "not_on_session")
    locked = await served.post(ACQUIRE, acquisition("one"))
    assert locked[0] == 423 and float(locked[2]["retry-after"]) > 0
    assert await served.leases("one") == [holder]


async def test_requests_of_one_message_are_all_answered(served: Served) -> None:
    names = [f"limit-{i}" for i in range(20)]
    for name in names:
        await served.create(name, 1)
    async with served.session() as wire:
        requests = [wire.request(ACQUIRE, acquisition(name)) for name in names]
        await wire.send(*(record for _, record in requests))
        granted = await wire.wait_for(*(ident for ident, _ in requests))
        assert {a.status for a in granted.values()} == {200}
        assert wire.messages_with_answers <= len(names)
        releases = [wire.request(RELEASE, {"lease_id": a.body["lease_id"]}) for a in granted.values()]
        await wire.send(*(record for _, record in releases))
        released = await wire.wait_for(*(ident for ident, _ in releases))
        assert {a.status for a in released.values()} == {204}
    for name in names:
        assert await served.leases(name) == []


async def test_cancel_withdraws_a_waiting_request(served: Served) -> None:
    await served.create("one", 1)
    holder = (await served.post(ACQUIRE, acquisition("one")))[1]["lease_id"]
    async with served.session() as wire:
        ident = await served.wait_in_queue(wire, "one")
        await wire.send(protocol.record(protocol.CANCEL, ident))
        withdrawn = (await wire.wait_for(ident))[ident]
        assert withdrawn.status == 499
        assert await served.queued() == 0
        # The session goes on; the slot goes to nobody when the holder leaves.
        assert (await wire.call(RELEASE, {"lease_id": holder})).status == 204
    assert await served.leases("one") == []


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# --- the end of a session ----------------------------------------------------------------------------


async def test_a_session_that_ends_releases_what_its_client_did_not_acknowledge(served: Served) -> None:
    await served.create("kept", 1)
    await served.create("unread", 1)
    await served.create("full", 1)
    full_holder = (await served.post(ACQUIRE, acquisition("full")))[1]["lease_id"]
    async with served.session() as wire:
        kept = (await wire.call(ACQUIRE, acquisition("kept"))).body["lease_id"]
        await wire.ack()  # the server has confirmed it knows the client has this grant
        unread = (await wire.call(ACQUIRE, acquisition("unread"))).body["lease_id"]
        await served.wait_in_queue(wire, "full")
    # The client closed without acknowledging the second grant: it is released, the wait is
    # withdrawn, and what the client acknowledged stays held (its holder renews it elsewhere).
    await served.until(lambda: _is(served.leases("unread"), []), f"{unread} released")
    await served.until_queued(0)  # the wait withdrawn
    assert await served.leases("kept") == [kept]
    assert await served.leases("full") == [full_holder]


async def test_a_server_shutdown_keeps_what_it_sent(storage: Storage, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:  # outlives the server
        async with served_app(storage, tmp_path) as served:
            await served.create("held", 1)
            await served.create("full", 1)
            await served.post(ACQUIRE, acquisition("full"))
            url = "ws" + served.url.removeprefix("http") + protocol.PATH
            ws = await http.ws_connect(url, protocols=[protocol.SUBPROTOCOL])
            wire = Wire(ws)
            lease_id = (await wire.call(ACQUIRE, acquisition("held"))).body["lease_id"]  # not acknowledged
            await served.wait_in_queue(wire, "full")
            closing = asyncio.ensure_future(wire.closed())
        # The server has shut down: the client was told "service restart".
        assert await asyncio.wait_for(closing, BOUND) == protocol.SERVICE_RESTART
        await ws.close()
    # What it sent is held (its client renews it on the next server); the wait was withdrawn.
    assert [info.lease_id for info in await storage.list_leases("held")] == [lease_id]
    rows = await storage.backend.run(lambda tx: tx.all("SELECT id FROM waiters WHERE lease_id IS NULL"))
    assert rows == []


async def test_at_a_shutdown_a_waiting_request_is_answered_503_with_its_place(
    storage: Storage, tmp_path: Path
) -> None:
    """slotkeeper's server answers the queue 503 ``shutting_down`` (with the waiter's id, to take
    its place back) before anything else; a session delivers that answer before its websocket
    is closed with 1012."""
    storage.clock = time.time
    settings = Settings(home=tmp_path)
    app = create_app(settings, storage=storage)

    def make(config: uvicorn.Config) -> uvicorn.Server:
        return Server(config, app, settings)

    async with aiohttp.ClientSession() as http:  # outlives the server
        async with serving(app, make, ws="auto") as url:
            served = Served(url, http, storage)
            await served.create("full", 1)
            await served.post(ACQUIRE, acquisition("full"))
            ws = await http.ws_connect(
                "ws" + url.removeprefix("http") + protocol.PATH, protocols=[protocol.SUBPROTOCOL]
            )
            wire = Wire(ws)
            waiting = await served.wait_in_queue(wire, "full")
            answered = asyncio.ensure_future(wire.wait_for(waiting))  # reads until the answer
        # The server has shut down (leaving ``serving``).
        answer = (await asyncio.wait_for(answered, BOUND))[waiting]
        assert (answer.status, answer.body["code"]) == (503, "shutting_down")
        assert answer.body["waiter_id"] and answer.retry_after is not None
        assert await wire.closed() == protocol.SERVICE_RESTART
        await ws.close()


# --- what a session refuses ---------------------------------------------------------------------------


async def test_auth_is_checked_on_the_upgrade(storage: Storage, tmp_path: Path) -> None:
    async with served_app(storage, tmp_path, api_auth_string=AUTH) as served:
        await served.create("db")
        async with served.session() as wire:  # with the header
            assert (await wire.call(ACQUIRE, acquisition("db"))).status == 200
        url = "ws" + served.url.removeprefix("http") + protocol.PATH
        for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await served.http.ws_connect(url, protocols=[protocol.SUBPROTOCOL], headers=headers)
            assert refused.value.status == 401


async def test_a_web_page_of_another_site_cannot_open_a_session(served: Served) -> None:
    """Browsers send Origin on every websocket upgrade and CORS does not apply there: without this
    check any page a user opens could take slots on a server without auth."""
    await served.create("db")
    url = "ws" + served.url.removeprefix("http") + protocol.PATH
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.http.ws_connect(
            url, protocols=[protocol.SUBPROTOCOL], headers={"Origin": "https://evil.example"}
        )
    assert refused.value.status == 403
    own = served.url.split("/api")[0]  # a page of this server (the dashboard) may
    ws = await served.http.ws_connect(url, protocols=[protocol.SUBPROTOCOL], headers={"Origin": own})
    await ws.close()


async def test_a_client_must_offer_the_subprotocol(served: Served) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with served.session(protocols=["something-else"]):
            pass
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"\x01\x00\x00", id="truncated-header"),
        pytest.param(protocol.record(protocol.REQUEST, 1, b"no request line")[:-3], id="record-past-the-end"),
        pytest.param(protocol.record(protocol.REQUEST, 1, b"POST-no-space\n{}"), id="bad-request-line"),
        pytest.param(protocol.record(9, 1), id="unknown-kind"),
        pytest.param(protocol.record(protocol.ACK, 5), id="ack-of-messages-never-sent"),
        pytest.param(protocol.record(protocol.ACK, 0) * (protocol.MAX_RECORDS + 1), id="too-many-records"),
    ],
)
async def test_a_message_that_breaks_the_protocol_closes_the_session(served: Served, message: bytes) -> None:
    await served.create("db")
    async with served.session() as wire:
        await wire.send(message)
        assert await wire.closed() == protocol.PROTOCOL_ERROR
    async with served.session() as wire:  # the server goes on serving
        assert (await wire.call(ACQUIRE, acquisition("db"))).status == 200


async def test_a_request_number_in_use_and_text_messages_close_the_session(served: Served) -> None:
    await served.create("one", 1)
    await served.post(ACQUIRE, acquisition("one"))
    async with served.session() as wire:
        _, waiting = wire.request(ACQUIRE, acquisition("one", wait_seconds=60))
        await wire.send(waiting, waiting)
        assert await wire.closed() == protocol.PROTOCOL_ERROR
    await served.until_queued(0)  # the wait withdrawn
    async with served.session() as wire:
        await wire.ws.send_str("hello")
        assert await wire.closed() == protocol.UNSUPPORTED_DATA


async def test_requests_beyond_the_bound_are_answered_429(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint, "MAX_IN_FLIGHT", 1)
    await served.create("one", 1)
    await served.create("other", 1)
    holder = (await served.post(ACQUIRE, acquisition("one")))[1]["lease_id"]
    async with served.session() as wire:
        waiting = await served.wait_in_queue(wire, "one")
        refused = await wire.call(ACQUIRE, acquisition("other"))
        assert (refused.status, refused.body["code"], refused.retry_after) == (429, "session_busy", "1")
        await served.post(RELEASE, {"lease_id": holder})
        assert (await wire.wait_for(waiting))[waiting].status == 200


async def test_a_body_over_the_servers_bound_is_answered_413_as_over_http(
    storage: Storage, tmp_path: Path
) -> None:
    async with served_app(storage, tmp_path, max_body_bytes=1024) as served:
        await served.create("db")
        big = acquisition("db", holder={"type": "task_run", "id": "x" * 2000})
        async with served.session() as wire:
            over_session = await wire.call(ACQUIRE, big)
            status, body, _ = await served.post(ACQUIRE, big)
            assert (
                (over_session.status, over_session.body)
                == (status, body)
                == (
                    413,
                    {"detail": "Request body is larger than 1024 bytes.", "code": "body_too_large"},
                )
            )
            assert (await wire.call(ACQUIRE, acquisition("db"))).status == 200


async def test_a_client_that_does_not_read_its_answers_is_not_read_either(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answers that cannot be sent pile up to ``MAX_UNSENT``; then the session reads nothing more
    from its client until they leave (so a client cannot make the server hold unbounded answers)."""
    monkeypatch.setattr(endpoint, "MAX_UNSENT", 2)
    sending = asyncio.Event()
    release = asyncio.Event()

    class Stuck:
        """A websocket whose sends block until released, as when the client does not read."""

        def __init__(self) -> None:
            self.scope = {"type": "websocket", "path": "/api" + protocol.PATH, "headers": []}
            self.app = SimpleNamespace(state=SimpleNamespace(storage=None, settings=Settings()))

        async def send(self, message: Any) -> None:
            sending.set()
            await release.wait()

    state = endpoint.Session(Stuck(), endpoint.HotPaths([], endpoint._nowhere), "/api")  # type: ignore[arg-type]
    for ident in (1, 2, 3):  # answered at once (404: not a session route), never sent
        state.received(
            protocol.record(protocol.REQUEST, ident, protocol.request_payload("POST", "/x", b"{}"))
        )
    await asyncio.wait_for(sending.wait(), BOUND)  # the first answer is being sent, and blocks
    state.received(protocol.record(protocol.REQUEST, 4, protocol.request_payload("POST", "/x", b"{}")))
    state.received(protocol.record(protocol.REQUEST, 5, protocol.request_payload("POST", "/x", b"{}")))
    room = asyncio.ensure_future(state.room())
    for _ in range(5):  # every task that could run has run
        await asyncio.sleep(0)
    assert not room.done()  # two answers wait: no more reading
    release.set()
    await asyncio.wait_for(room, BOUND)
    await state.end(protocol.NORMAL)


async def test_a_client_that_never_acknowledges_its_grants_is_closed(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint, "MAX_UNACKED", 2)
    await served.create("db", 10)
    async with served.session() as wire:
        for _ in range(3):  # three messages with a grant, none acknowledged
            await wire.call(ACQUIRE, acquisition("db"))
        _, record = wire.request(ACQUIRE, acquisition("db"))
        await wire.send(record)
        assert await wire.closed() == protocol.PROTOCOL_ERROR
    # Nobody acknowledged them: they are released.
    await served.until(lambda: _is(served.leases("db"), []), "the unacknowledged grants released")
