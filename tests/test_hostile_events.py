"""Hostile clients of the events API cannot hurt the server (issue 11).

Each test pins one defect a fuzzer or a hand-written attack found, and failed before its fix:
websocket frames the endpoints do not speak and handshakes that never come (defect 10), a slow
subscriber's queue bounded by bytes as well as by count (defect 5), ...

Nothing is timed: a wait is bounded (``BOUND`` seconds) only so that a broken server fails the
test instead of hanging it.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from slotkeeper.storage import Storage
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
