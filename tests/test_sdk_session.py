"""The SDK's session (:mod:`slotkeeper.sdk._session`): chosen by default, HTTP when it cannot be,
and what a lost session does to the leases it carried.

The app is served by uvicorn in this process (SQLite) and the SDK runs as in any process (its
blocks' requests on the test's loop, renewals on its background thread); the tests reach into
the SDK's runtime only to cut a connection or to see which transport a request took. Nothing is timed: waits are bounded (``PATIENCE``) only so
that a broken SDK fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slotkeeper import session as protocol
from slotkeeper.api.app import create_app
from slotkeeper.errors import ServerUnreachable
from slotkeeper.models import LimitSpec
from slotkeeper.sdk import ConcurrencyLeaseLostError, _session, _wire, aconcurrency
from slotkeeper.sdk._runtime import Endpoint, protocol_from_env, runtime
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, migrate, open_storage
from tests.conftest import serving

PATIENCE = 60.0
V2 = "/v2/concurrency_limits"


@pytest.fixture
async def sqlite_storage(tmp_path: Path) -> AsyncIterator[Storage]:
    url = f"sqlite:///{tmp_path / 'slotkeeper.db'}"
    migrate(url)
    store = open_storage(url)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def served(storage: Storage, tmp_path: Path, **config: Any) -> AsyncIterator[str]:
    async with serving(create_app(Settings(home=tmp_path), storage=storage), **config) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_endpoints() -> Iterator[None]:
    """Each test's servers get endpoints of their own (a port may be reused by another test)."""
    yield
    rt = runtime()
    for key in [k for k in rt.endpoints if k[0].startswith("http://127.0.0.1:")]:
        endpoint = rt.endpoints.pop(key)
        rt.loop.call_soon_threadsafe(endpoint.close)


def endpoint(url: str) -> Endpoint:
    """The endpoint the ``async with`` blocks of the running loop use (their own loop's)."""
    return runtime().here((url, None))


def renewing(url: str) -> Endpoint:
    """The endpoint that renews leases (the runtime's, on the SDK's thread)."""
    return runtime().endpoints[(url, None)]


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.01)


def cut(ep: Endpoint) -> None:
    """Drop the session's connection without a close (a network failure), from its loop."""
    session = ep.session
    assert session is not None and session.link is not None and session.link.transport is not None
    session.link.loop.call_soon_threadsafe(session.link.transport.abort)


async def held(storage: Storage, name: str) -> list[str]:
    return [info.lease_id for info in await storage.list_leases(name)]


# --- which transport -------------------------------------------------------------------------------


async def test_the_sdk_speaks_a_session_by_default(sqlite_storage: Storage, tmp_path: Path) -> None:
    await sqlite_storage.create_limit(LimitSpec("db", 1))
    async with served(sqlite_storage, tmp_path, ws="auto") as url:
        for _ in range(3):
            async with aconcurrency("db", api_url=url, strict=True) as lease:
                assert await held(sqlite_storage, "db") == [lease.lease_id]
        session = endpoint(url).session
        assert session is not None and session.link is not None
        assert session.link.next_id == 7  # every acquisition and release went over it
    assert await held(sqlite_storage, "db") == []


async def test_a_block_acquires_and_releases_on_its_own_loop(sqlite_storage: Storage, tmp_path: Path) -> None:
    """``async with`` sends its acquisition and its release from the caller's loop (no hop to the
    SDK's thread and back), and acknowledges the grant before its body runs: a body that blocks
    its loop holds no grant the server could release with the session."""
    await sqlite_storage.create_limit(LimitSpec("db", 1))
    async with served(sqlite_storage, tmp_path, ws="auto") as url:
        here = threading.get_ident()
        async with aconcurrency("db", api_url=url, strict=True) as lease:
            link = endpoint(url).session.link  # type: ignore[union-attr]
            assert link is not None and link.loop is asyncio.get_running_loop()
            assert link.acked == link.received >= 1  # acknowledged already
            assert lease.lease_id in link.at_risk()  # ... and not confirmed yet: it just left
        assert link.next_id == 3  # the acquisition and the release, on this loop's link
        assert here == threading.get_ident()
    assert await held(sqlite_storage, "db") == []


async def test_a_server_without_sessions_is_spoken_to_over_http(
    sqlite_storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await sqlite_storage.create_limit(LimitSpec("db", 1))
    caplog.set_level(logging.INFO, "slotkeeper.sdk")
    # Without websockets (as behind a proxy that only passes HTTP), the upgrade is plain HTTP.
    async with served(sqlite_storage, tmp_path, ws="none") as url:
        async with aconcurrency("db", api_url=url, strict=True) as lease:
            assert await held(sqlite_storage, "db") == [lease.lease_id]
        session = endpoint(url).session
        assert session is not None and session.link is None
    assert any("offers no session" in m and "using HTTP" in m for m in caplog.messages)
    assert await held(sqlite_storage, "db") == []


async def test_http_only_when_asked(
    sqlite_storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sqlite_storage.create_limit(LimitSpec("db", 1))
    monkeypatch.setenv("SLOTKEEPER_SDK_PROTOCOL", "http")
    async with served(sqlite_storage, tmp_path, ws="auto") as url:
        async with aconcurrency("db", api_url=url, strict=True):
            pass
        assert endpoint(url).session is None
    monkeypatch.setenv("SLOTKEEPER_SDK_PROTOCOL", "carrier-pigeon")
    with pytest.raises(
        ValueError, match="SLOTKEEPER_SDK_PROTOCOL='carrier-pigeon': use one of session, http"
    ):
        protocol_from_env()


async def test_an_idle_session_is_closed_and_another_opened_when_needed(
    sqlite_storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_session, "PING_SECONDS", 0.05)
    monkeypatch.setattr(_session, "IDLE_SECONDS", 0.1)
    await sqlite_storage.create_limit(LimitSpec("db", 2))
    async with served(sqlite_storage, tmp_path, ws="auto") as url:
        async with aconcurrency("db", api_url=url, lease_duration=60, strict=True) as lease:
            session = endpoint(url).session
            assert session is not None
            first = session.link
            await until(lambda: session.link is None, "the idle link given up")
            assert first is not None
            await until(lambda: first.closed, "the idle link's connection closed")
            # Closing an idle link is not losing it: the lease is neither dropped nor renewed.
            assert not lease.lost
            async with aconcurrency("db", api_url=url, strict=True):  # a new link
                assert session.link is not None and session.link is not first
            assert await held(sqlite_storage, "db") == [lease.lease_id]
        assert await held(sqlite_storage, "db") == []


def test_no_session_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment is spoken to over HTTP: the endpoint opens no session."""
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:3128")
    assert Endpoint("http://127.0.0.1:4200/api", None).session is None
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert Endpoint("http://127.0.0.1:4200/api", None).session is not None


# --- a lost session --------------------------------------------------------------------------------


async def test_a_lease_the_server_knew_arrived_survives_a_lost_session(
    sqlite_storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await sqlite_storage.create_limit(LimitSpec("db", 1))
    caplog.set_level(logging.INFO, "slotkeeper.sdk")
    async with (
        served(sqlite_storage, tmp_path, ws="auto") as url,
        aconcurrency("db", api_url=url, lease_duration=60, strict=True) as lease,
    ):
        session = endpoint(url).session
        assert session is not None
        # The client acknowledged the grant and the server confirmed it: nothing at risk.
        await until(lambda: session.link is not None and not session.link.at_risk(), "the grant confirmed")
        cut(endpoint(url))
        # The SDK renews what it holds there at once, from its thread (the lease's renewals
        # live there, on a session of their own).
        renewals = renewing(url).session
        assert renewals is not None
        await until(lambda: renewals.link is not None and renewals.link.received >= 1, "the renewal answered")
        assert not lease.lost
        assert await held(sqlite_storage, "db") == [lease.lease_id]
    assert any("renewing the leases held there" in m for m in caplog.messages)
    assert await held(sqlite_storage, "db") == []


async def test_a_lease_the_server_did_not_know_arrived_is_lost_with_the_session(
    sqlite_storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grant arrives, the connection fails before the server hears it did: the server
    releases the lease (nobody might hold it), and the SDK reports it lost at once instead of
    holding it unknowingly."""
    # The acknowledgement never leaves (a block's grant is acknowledged before its body runs).
    monkeypatch.setattr(_session, "ACK_SECONDS", 3600.0)
    monkeypatch.setattr(_session, "ACK_AT_ONCE_SECONDS", 3600.0)
    await sqlite_storage.create_limit(LimitSpec("db", 1))
    async with served(sqlite_storage, tmp_path, ws="auto") as url:
        with pytest.raises(ConcurrencyLeaseLostError, match="the session that carried its grant was lost"):
            async with aconcurrency("db", api_url=url, lease_duration=60, strict=True) as lease:
                assert lease.lease_id in endpoint(url).session.link.at_risk()  # type: ignore[union-attr]
                cut(endpoint(url))
                await asyncio.sleep(PATIENCE)  # interrupted by the loss
                pytest.fail("the body was not interrupted")
        assert lease.lost
        await until_async(lambda: held(sqlite_storage, "db"), [], "the lease released by the server")


async def until_async(read: Callable[[], Any], expected: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while await read() != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def test_a_grant_that_comes_after_its_caller_gave_up_is_released(
    sqlite_storage: Storage, tmp_path: Path
) -> None:
    """A waiting request whose caller stopped waiting (its own bound ran out) is granted later:
    the link releases that lease, since nobody will ever hold it."""
    await sqlite_storage.create_limit(LimitSpec("one", 1))
    async with served(sqlite_storage, tmp_path, ws="auto") as url:
        async with aconcurrency("one", api_url=url, strict=True) as holder:
            session = endpoint(url).session
            assert session is not None
            body = b'{"names": ["one"], "slots": 1, "lease_duration": 300, "wait_seconds": 60}'
            with pytest.raises(ServerUnreachable, match="No answer"):
                await session.request("POST", f"{V2}/increment-with-lease", body, timeout=0.2)
            assert await held(sqlite_storage, "one") == [holder.lease_id]
        # The release hands the slot to the waiting request; its grant is released at once.
        await until_async(lambda: held(sqlite_storage, "one"), [], "the late grant released")


class _Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Frames:
    """Stands for the websocket protocol object: records what the link sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_binary(self, data: bytes) -> None:
        self.sent.append(data)

    def data_to_send(self) -> list[bytes]:
        return []


def scripted_link() -> _session.Link:
    """A link that is open, sends into the void and reads what the test hands it."""
    session = _session.Session(_wire.Origin("http://127.0.0.1:1/api", None), None, lambda at_risk: None)
    link = _session.Link(session)
    link.transport = _Sink()
    link.ws = _Frames()  # type: ignore[assignment]
    link.open = True
    return link


def grant(ident: int, lease_id: str) -> bytes:
    body = b'{"lease_id": "%s"}' % lease_id.encode()
    return protocol.record(protocol.ANSWER, ident, protocol.answer_payload(200, None, body))


async def test_an_answer_that_comes_as_the_request_is_cancelled_is_kept() -> None:
    """The answer arrives and the caller is cancelled in the same loop step: the request returns
    the answer all the same (a grant its caller then releases), and sends no ``CANCEL``."""
    link = scripted_link()
    task = asyncio.ensure_future(link.exchange("POST", f"{V2}/increment-with-lease", b"{}", 10.0, True))
    await asyncio.sleep(0)  # sent; waiting for the answer
    link._message(grant(1, "x"))
    task.cancel()
    status, _, _, body = await task
    assert (status, body) == (200, b'{"lease_id": "x"}')
    await asyncio.sleep(0)
    assert not any(kind == protocol.CANCEL for sent in link.ws.sent for kind, _, _ in protocol.records(sent))  # type: ignore[attr-defined]
    assert link.at_risk() == {"x"}


async def test_a_grant_stays_at_risk_until_the_server_confirms_it_was_read() -> None:
    link = scripted_link()
    first = asyncio.ensure_future(link.exchange("POST", f"{V2}/increment-with-lease", b"{}", 10.0, False))
    second = asyncio.ensure_future(link.exchange("POST", f"{V2}/increment-with-lease", b"{}", 10.0, False))
    await asyncio.sleep(0)
    # A message with a grant, then a broken record: the grant read before it is tracked.
    with pytest.raises(protocol.ProtocolError):
        link._message(grant(1, "a") + protocol.record(9, 0))
    assert (await first)[0] == 200
    assert link.at_risk() == {"a"}
    link._message(grant(2, "b"))
    assert link.at_risk() == {"a", "b"}
    link._message(protocol.record(protocol.ACKED, 1))  # the server read the client's ACK of message 1
    assert link.at_risk() == {"b"}
    link._message(protocol.record(protocol.ACKED, 3))
    assert link.at_risk() == set()
    assert (await second)[0] == 200


def test_a_batch_leaves_in_messages_of_bounded_records_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> list[bytes]:
        link = scripted_link()
        for i in range(7):
            link._send(f"{V2}/decrement-with-lease", b"x" * (100 if i == 5 else 10))
        link._flush()
        return link.ws.sent  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(protocol, "MAX_RECORDS", 3)
    monkeypatch.setattr(_session, "MAX_SEND", 200)
    sent = asyncio.run(main())
    counts = [len(list(protocol.records(message))) for message in sent]
    assert sum(counts) == 7 and max(counts) <= 3
    assert all(len(message) <= 200 for message in sent)
    # In order: the requests are numbered as they were made.
    assert [ident for message in sent for _, ident, _ in protocol.records(message)] == list(range(1, 8))
