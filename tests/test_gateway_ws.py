"""The gateway's websocket relay (gateway/ws.py) against a fake upstream (tests/gateway_fake.py).

Nothing is timed: every wait is bounded only so that a broken relay fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from slotkeeper.gateway import ws
from slotkeeper.storage import Storage
from tests.conftest import free_port
from tests.gateway_fake import FakeUpstream, fake_upstream
from tests.test_gateway_proxy import Gateway, gateway_on

BOUND = 30.0


@pytest.fixture
async def gateway(storage: Storage, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with fake_upstream() as upstream, gateway_on(storage, tmp_path, upstream.url, upstream) as served:
        yield served


def _ws(url: str) -> str:
    return "ws" + url.removeprefix("http")


async def _until(condition: object) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_frames_go_both_ways_with_the_upstreams_subprotocol(gateway: Gateway) -> None:
    async with gateway.http.ws_connect(
        _ws(gateway.url) + "/events/in", protocols=["prefect"], headers={"Authorization": "Basic abc"}
    ) as socket:
        assert socket.protocol == "prefect"
        for text in ('{"type": "auth", "token": null}', "second", "third"):
            await socket.send_str(text)
            assert await socket.receive_str(timeout=BOUND) == "echo:" + text
        await socket.send_bytes(b"\x00\x01binary")
        assert await socket.receive_bytes(timeout=BOUND) == b"\x00\x01binary"
    seen = gateway.upstream.requests[-1]
    assert seen["raw_path"] == "/api/events/in"
    assert dict((k.lower(), v) for k, v in seen["headers"])["authorization"] == "Basic abc"
    await _until(lambda: gateway.upstream.sockets_open == 0)  # the client's close reached it


async def test_the_upstreams_close_code_reaches_the_client(gateway: Gateway) -> None:
    async with gateway.http.ws_connect(_ws(gateway.url) + "/ws/echo") as socket:
        await socket.send_str("close:4001")
        message = await socket.receive(timeout=BOUND)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 4001


@pytest.fixture
def filtered() -> Iterator[list[str]]:
    """A filter on /api/ws/echo that drops "drop" and upper-cases the rest; the frames it saw."""
    seen: list[str] = []

    async def keep(text: str) -> str | None:
        seen.append(text)
        return None if text == "drop" else text.upper()

    ws.FRAME_FILTERS["/api/ws/echo"] = keep
    try:
        yield seen
    finally:
        del ws.FRAME_FILTERS["/api/ws/echo"]


async def test_a_routes_frame_filter_rewrites_or_drops_client_frames_in_order(
    gateway: Gateway, filtered: list[str]
) -> None:
    async with gateway.http.ws_connect(_ws(gateway.url) + "/ws/echo") as socket:
        for text in ("a", "drop", "b", "drop", "c"):
            await socket.send_str(text)
        answers = [await socket.receive_str(timeout=BOUND) for _ in range(3)]
    assert answers == ["echo:A", "echo:B", "echo:C"]
    assert filtered == ["a", "drop", "b", "drop", "c"]
    # Other routes keep the pass-through default.
    assert ws.frame_filter("/api/events/out") is ws.pass_through


async def test_the_handshake_completes_when_the_upstream_is_down_then_closes_saying_why(
    storage: Storage, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    async with (
        gateway_on(storage, tmp_path, dead, FakeUpstream()) as gw,
        gw.http.ws_connect(_ws(gw.url) + "/events/in", protocols=["prefect"]) as socket,
    ):
        assert socket.protocol == "prefect"
        message = await socket.receive(timeout=BOUND)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == ws.TRY_AGAIN_LATER
        assert "cannot be reached" in message.extra


async def test_slotkeepers_own_websockets_are_not_relayed(gateway: Gateway) -> None:
    async with gateway.http.ws_connect(
        _ws(gateway.url) + "/slotkeeper/session", protocols=["slotkeeper.session.v1"]
    ) as socket:
        assert socket.protocol == "slotkeeper.session.v1"
    assert gateway.upstream.requests == []


async def test_the_upstream_going_away_closes_the_client_and_leaves_no_task(gateway: Gateway) -> None:
    tasks_before = len(asyncio.all_tasks())
    async with gateway.http.ws_connect(_ws(gateway.url) + "/ws/echo") as socket:
        await socket.send_str("hello")
        assert await socket.receive_str(timeout=BOUND) == "echo:hello"
        await gateway.upstream.stop()  # closes its websockets (1001, going away)
        message = await socket.receive(timeout=BOUND)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data in (1001, ws.TRY_AGAIN_LATER)
    await _until(lambda: len(asyncio.all_tasks()) <= tasks_before)


async def test_many_relays_opened_and_dropped_leave_no_upstream_socket_open(gateway: Gateway) -> None:
    async def one(i: int) -> None:
        socket = await gateway.http.ws_connect(_ws(gateway.url) + "/events/in")
        await socket.send_str(f"frame {i}")
        assert await socket.receive_str(timeout=BOUND) == f"echo:frame {i}"
        await socket.close()

    for _ in range(5):
        await asyncio.gather(*(one(i) for i in range(20)))
    await _until(lambda: gateway.upstream.sockets_open == 0)
