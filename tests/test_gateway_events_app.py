"""Events through a gateway app (served in process) in front of a fake upstream that speaks
Prefect's events API: client copies of slot events are dropped on /api/events/in while every
other frame goes on; slotkeeper's own events reach the upstream's ``POST /api/events`` with the
client's run context; the upstream down delays them and loses none."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from slotkeeper.events import builders
from slotkeeper.gateway import ws
from slotkeeper.gateway.outbox import EVENTS_IN
from slotkeeper.storage import Storage
from tests.gateway_fake import FakeUpstream
from tests.test_gateway_proxy import Gateway, gateway_on
from tests.test_gateway_ws import _until, _ws

BOUND = 30.0


@dataclass
class EventsUpstream(FakeUpstream):
    """The fake upstream, with Prefect's ``POST /api/events`` (stored by id) and the text frames
    its ``/api/events/in`` received."""

    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    posts: int = 0
    down: bool = False

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/api/events", self.record_events)
        return app

    async def record_events(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"detail": "down"}, status=503)
        self.posts += 1
        for event in orjson.loads(await request.read()):
            self.stored.setdefault(event["id"], event)
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def events_upstream() -> AsyncIterator[EventsUpstream]:
    upstream = EventsUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest.fixture
async def gateway(storage: Storage, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with (
        events_upstream() as upstream,
        gateway_on(
            storage,
            tmp_path,
            upstream.url,
            upstream,
            outbox_context_wait_seconds=30.0,  # the fake clock stands still: only copies release events
            outbox_max_backoff_seconds=0.1,
        ) as served,
    ):
        yield served


async def storage_backlog(gateway: Gateway) -> int:
    async with gateway.http.get(gateway.url.removesuffix("/api") + "/metrics") as answer:
        for line in (await answer.text()).splitlines():
            if line.startswith("slotkeeper_outbox_events "):
                return int(float(line.split()[1]))
    raise AssertionError("no slotkeeper_outbox_events in /metrics")


def slot_events(upstream: EventsUpstream) -> list[dict[str, Any]]:
    return [e for e in upstream.stored.values() if e["event"] in builders.SLOT_EVENTS]


async def test_copies_are_dropped_other_frames_pass_and_slot_events_arrive_with_run_context(
    gateway: Gateway,
) -> None:
    upstream = gateway.upstream
    assert isinstance(upstream, EventsUpstream)
    status, limit, _ = await gateway.call(
        "POST", "/v2/concurrency_limits/", json={"name": "tag:db", "limit": 1}
    )
    assert status == 201
    task_run, flow_run = str(uuid.uuid4()), str(uuid.uuid4())
    status, granted, _ = await gateway.call(
        "POST",
        "/v2/concurrency_limits/increment-with-lease",
        json={"names": ["tag:db"], "slots": 1, "holder": {"type": "task_run", "id": task_run}},
    )
    assert status == 200
    context = [
        {"prefect.resource.id": f"prefect.flow-run.{flow_run}", "prefect.resource.role": "flow-run"},
        {"prefect.resource.id": f"prefect.task-run.{task_run}", "prefect.resource.role": "task-run"},
    ]
    copy = {
        "occurred": "2027-01-15T08:00:00Z",
        "event": builders.ACQUIRED,
        "resource": {
            "prefect.resource.id": f"prefect.concurrency-limit.{limit['id']}",
            "prefect.resource.name": "tag:db",
            "slots-acquired": "1",
            "limit": "1",
        },
        "related": context,
        "payload": {},
        "id": str(uuid.uuid4()),
    }
    task_event = {
        "occurred": "2027-01-15T08:00:00Z",
        "event": "prefect.task-run.Running",
        "resource": {"prefect.resource.id": f"prefect.task-run.{task_run}"},
        "id": str(uuid.uuid4()),
    }
    async with gateway.http.ws_connect(_ws(gateway.url) + "/events/in") as socket:
        await socket.send_str('{"type": "auth", "token": null}')
        assert await socket.receive_str(timeout=BOUND) == 'echo:{"type": "auth", "token": null}'
        await socket.send_str(orjson.dumps(copy).decode())  # dropped: no echo
        await socket.send_str(orjson.dumps(task_event).decode())
        assert await socket.receive_str(timeout=BOUND) == "echo:" + orjson.dumps(task_event).decode()
    await _until(lambda: len(slot_events(upstream)) == 1)
    (acquired,) = slot_events(upstream)
    assert acquired["id"] != copy["id"] and acquired["event"] == builders.ACQUIRED
    assert {r["prefect.resource.id"] for r in acquired["related"]} >= {
        c["prefect.resource.id"] for c in context
    }
    assert ws.FRAME_FILTERS[EVENTS_IN].dropped == 1  # type: ignore[attr-defined]

    # The upstream down: acquisitions go on, the events wait, and arrive once it is back.
    upstream.down = True
    status, _, _ = await gateway.call(
        "POST", "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": granted["lease_id"]}
    )
    assert status == 204
    status, _, _ = await gateway.call(
        "POST", "/v2/concurrency_limits/increment", json={"names": ["tag:db"], "slots": 1}
    )
    assert status == 200
    upstream.down = False
    await _until(lambda: len(slot_events(upstream)) == 2)
    released = next(e for e in slot_events(upstream) if e["follows"] == acquired["id"])
    assert f"prefect.flow-run.{flow_run}" in {r["prefect.resource.id"] for r in released["related"]}
    async with gateway.http.get(gateway.url.removesuffix("/api") + "/metrics") as answer:
        text = await answer.text()
    assert "slotkeeper_gateway_slot_copies_dropped_total 1.0" in text


async def test_without_an_upstream_nothing_is_queued(storage: Storage, client: Any) -> None:
    assert (await client.post("/v2/concurrency_limits/", json={"name": "db", "limit": 1})).status_code == 201
    assert await storage.outbox_store().oldest(10) == []
    assert EVENTS_IN not in ws.FRAME_FILTERS
