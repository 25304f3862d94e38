"""The live views (server-sent events) through a real server (uvicorn in this process), on SQLite
and PostgreSQL: what a dashboard receives when limits change, and that a stream ends cleanly.

Every wait reads the stream until the expected message arrives; the bound on it only keeps a
broken stream from hanging the suite, it measures nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slotkeeper.api import live
from slotkeeper.api.app import create_app
from slotkeeper.events.broker import Broker
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import ServerProcess, serving

V2 = "/v2/concurrency_limits"
#: Bound on waiting for one message (against hanging, not a timing claim).
PATIENCE_SECONDS = 30.0


@dataclass
class Message:
    kind: str
    data: Any
    id: str | None


class Stream:
    """The messages of one server-sent event stream, parsed as a browser's ``EventSource`` does."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.retry: int | None = None

    async def next(self) -> Message | None:
        """The next message; None when the stream ended."""
        kind, data, ident = "message", "", None
        async for line in self.lines:
            if line == "":
                if data:
                    return Message(kind, json.loads(data), ident)
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data += value
            elif field == "id":
                ident = value
            elif line.startswith("retry:"):
                self.retry = int(line.split(":")[1])
        return None

    async def until(self, kind: str, check: Any = lambda data: True) -> Message:
        """Read until a message of ``kind`` whose data passes ``check``."""
        async with asyncio.timeout(PATIENCE_SECONDS):
            while (message := await self.next()) is not None:
                if message.kind == kind and check(message.data):
                    return message
        pytest.fail(f"the stream ended before a {kind!r} message")


@pytest.fixture
async def server(storage: Storage, settings: Settings) -> AsyncIterator[tuple[str, Any]]:
    app = create_app(settings, storage=storage)
    async with serving(app) as url:
        yield url, app


@contextlib.asynccontextmanager
async def streaming(url: str, **params: Any) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(timeout=PATIENCE_SECONDS) as http,
        http.stream("GET", url, params=params) as r,
    ):
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        yield Stream(r)


async def test_a_limits_stream_shows_holders_and_events_as_they_change(server: tuple[str, Any]) -> None:
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as api:
        assert (await api.post(f"{V2}/", json={"name": "db", "limit": 2})).status_code == 201
        async with streaming(f"{url}/live/limits/db") as stream:
            created = await stream.until("event")
            assert created.data["event"] == "prefect.concurrency-limit.created"
            assert created.id == created.data["id"]
            first = await stream.until("state")
            assert (first.data["holders"], first.data["queue"], first.data["limit"]["leased_slots"]) == (
                [],
                [],
                0,
            )
            assert stream.retry == live.RETRY_MILLISECONDS

            r = await api.post(f"{V2}/increment-with-lease", json={"names": ["db"], "slots": 2})
            lease_id = r.json()["lease_id"]
            acquired = await stream.until("event")
            assert acquired.data["event"] == "prefect.concurrency-limit.acquired"
            held = await stream.until("state", lambda s: s["holders"])
            assert [(h["lease_id"], h["slots"]) for h in held.data["holders"]] == [(lease_id, 2)]
            assert held.data["limit"]["active_slots"] == 2

            # A request joins the queue: no event, the view is read again and shows it.
            waiting = asyncio.ensure_future(
                api.post(f"{V2}/increment-with-lease", json={"names": ["db"], "slots": 1, "wait_seconds": 60})
            )
            queued = await stream.until("state", lambda s: s["queue"])
            assert [w["position"] for w in queued.data["queue"]] == [1]
            assert queued.data["limit"]["waiters"] == 1

            assert (await api.delete(f"{V2}/leases/{lease_id}")).status_code == 204
            released = await stream.until("event")
            assert (released.data["event"], released.data["payload"]) == (
                "prefect.concurrency-limit.released",
                {"reason": "operator"},
            )
            assert released.data["follows"] == acquired.data["id"]
            assert (await waiting).status_code == 200
            handed = await stream.until("state", lambda s: not s["queue"])
            assert [h["slots"] for h in handed.data["holders"]] == [1]

            assert (await api.delete(f"{V2}/db")).status_code == 204
            gone = await stream.until("deleted")
            assert gone.data == {"id": created.data["resource"]["prefect.resource.id"].rsplit(".", 1)[1]}
            assert await stream.next() is None  # the stream ends with the limit


async def test_a_limits_stream_backfills_its_last_events_once(server: tuple[str, Any]) -> None:
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as api:
        await api.post(f"{V2}/", json={"name": "db", "limit": 5})
        await api.post(f"{V2}/", json={"name": "other", "limit": 5})
        for _ in range(3):
            await api.post(f"{V2}/increment-with-lease", json={"names": ["db", "other"], "slots": 1})
        async with streaming(f"{url}/live/limits/db", backfill=2) as stream:
            backfilled = [await stream.until("event"), await stream.until("event")]
            # The last two, oldest first, and only db's own.
            assert [m.data["event"] for m in backfilled] == ["prefect.concurrency-limit.acquired"] * 2
            assert {m.data["resource"]["prefect.resource.name"] for m in backfilled} == {"db"}
            assert backfilled[0].data["occurred"] <= backfilled[1].data["occurred"]
            await stream.until("state")


async def test_a_stream_of_no_such_limit_is_404(server: tuple[str, Any]) -> None:
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as api:
        r = await api.get("/live/limits/nothing")
        assert (r.status_code, r.json()) == (
            404,
            {"detail": "Concurrency Limit not found", "code": "limit_not_found"},
        )
        assert (await api.get("/live/limits/db", params={"backfill": 201})).status_code == 422
        assert (await api.get("/live/limits", params={"limit": 201})).status_code == 422


async def test_the_overview_stream_follows_its_page(server: tuple[str, Any]) -> None:
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as api:
        for name in ("a", "b", "c"):
            await api.post(f"{V2}/", json={"name": name, "limit": 1})
        async with streaming(f"{url}/live/limits", limit=2) as stream:
            first = await stream.until("overview")
            assert ([lim["name"] for lim in first.data["limits"]], first.data["total"]) == (["a", "b"], 3)
            await api.post(f"{V2}/increment-with-lease", json={"names": ["b"], "slots": 1})
            held = await stream.until("overview", lambda p: p["limits"][1]["leased_slots"] == 1)
            assert held.data["limits"][1]["name"] == "b"
            await api.post(f"{V2}/", json={"name": "0-first", "limit": 4})
            shifted = await stream.until("overview", lambda p: p["total"] == 4)
            assert [lim["name"] for lim in shifted.data["limits"]] == ["0-first", "a"]


async def test_streams_end_when_the_app_ends_them_and_unsubscribe(server: tuple[str, Any]) -> None:
    url, app = server
    broker: Broker = app.state.broker
    async with httpx.AsyncClient(base_url=url) as api:
        await api.post(f"{V2}/", json={"name": "db", "limit": 1})
    async with streaming(f"{url}/live/limits/db") as one, streaming(f"{url}/live/limits") as two:
        await one.until("state")
        await two.until("overview")
        assert broker.subscribers == 2
        live.end_streams(app)
        async with asyncio.timeout(PATIENCE_SECONDS):
            assert await _drain(one) is None
            assert await _drain(two) is None
    async with asyncio.timeout(PATIENCE_SECONDS):
        while broker.subscribers:
            await asyncio.sleep(0.01)


async def _drain(stream: Stream) -> Message | None:
    while (message := await stream.next()) is not None:
        pass
    return message


@pytest.mark.slow
def test_a_server_with_dashboards_open_stops_at_once(tmp_path: Path) -> None:
    """SIGTERM ends the open streams first: uvicorn would otherwise wait for them for the whole
    grace period (the bound below is half of it: a stop takes about a second here)."""
    grace = 30.0
    with ServerProcess(tmp_path / "home", SLOTKEEPER_SHUTDOWN_GRACE_SECONDS=str(grace)) as server:
        assert server.call("POST", f"{V2}/", {"name": "db", "limit": 1})[0] == 201
        assert server.process is not None
        with (
            httpx.Client(timeout=PATIENCE_SECONDS) as http,
            http.stream("GET", f"{server.url}/live/limits/db") as one,
            http.stream("GET", f"{server.url}/live/limits") as two,
        ):
            lines = [one.iter_lines(), two.iter_lines()]
            for stream, first in zip(lines, ("event: state", "event: overview"), strict=True):
                assert first in stream  # read up to its first view
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            for stream in lines:
                for _ in stream:  # to the end: the server closes it
                    pass
            server.process.wait(timeout=grace)
            took = time.monotonic() - started
        assert took < grace / 2, server.log_text()
