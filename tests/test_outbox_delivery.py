"""Delivery of the outbox to the upstream (gateway/outbox.py): in commit order, the same ids, at
least once, deleted once acknowledged, one deliverer at a time, holding slot events briefly for
their run context. Storage on both backends; the upstream is a fake (here) or a small aiohttp
server speaking Prefect's ``POST /api/events`` (its answers, its auth)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from aiohttp import web

from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.gateway.context import RunContexts, client_copy
from slotkeeper.gateway.outbox import (
    COMMIT,
    COPY,
    OUTBOX_LOOP,
    Deliverer,
    DeliveryFailed,
    EventsEndpoint,
    wire,
)
from slotkeeper.models import Holder, LimitSpec
from slotkeeper.storage import Storage
from slotkeeper.supervisor import Supervisor
from tests.conftest import FakeClock, free_port, take
from tests.test_gateway_events import LIMIT

#: Bound against hanging, never an expectation.
DEADLINE = 30.0


class FakeUpstream:
    """Stores events by id, as Prefect's server does; can be made to fail."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.stored: dict[str, EventRecord] = {}
        self.failing: Exception | None = None

    async def send(self, events: Sequence[EventRecord]) -> None:
        if self.failing is not None:
            raise self.failing
        for e in events:
            self.sent.append(e.id)
            self.stored.setdefault(e.id, e)


def deliverer(storage: Storage, upstream: FakeUpstream, clock: FakeClock, **kwargs: Any) -> Deliverer:
    contexts = kwargs.pop("contexts", None)
    if contexts is None:
        contexts = RunContexts(wait=0.0, clock=clock)
    return Deliverer(storage.outbox_store(), upstream, contexts, clock=clock, **kwargs)


async def stored_ids(storage: Storage) -> list[str]:
    rows = await storage.backend.run(lambda tx: tx.all("SELECT id FROM events ORDER BY occurred, id"))
    return [r[0] for r in rows]


async def test_events_go_out_in_commit_order_with_their_ids_and_leave_the_outbox(
    storage: Storage, clock: FakeClock
) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    granted = await take(storage)
    await storage.release_lease(granted.lease_id)
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock)
    await d.deliver()
    assert upstream.sent == await stored_ids(storage)
    assert [upstream.stored[i].event for i in upstream.sent] == [
        builders.CREATED,
        builders.ACQUIRED,
        builders.RELEASED,
    ]
    assert (await storage.outbox_store().backlog()).events == 0
    assert d.stats.delivered == 3


async def test_an_upstream_down_loses_nothing_and_each_id_is_stored_once(
    storage: Storage, clock: FakeClock
) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock)
    upstream.failing = DeliveryFailed("down")
    for _ in range(3):  # acquisitions go on while the upstream is down
        granted = await take(storage)
        await storage.release_lease(granted.lease_id)
        with pytest.raises(DeliveryFailed):
            await d.deliver()
    assert (await storage.outbox_store().backlog()).events == 7
    upstream.failing = None
    await d.deliver()
    assert sorted(upstream.stored) == sorted(await stored_ids(storage))
    assert len(upstream.sent) == 7  # nothing had been taken before
    assert (await storage.outbox_store().backlog()).events == 0


async def test_a_batch_taken_but_not_acknowledged_is_sent_again_under_the_same_ids(
    storage: Storage, clock: FakeClock
) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    await take(storage)
    outbox = storage.outbox_store()

    class LostAnswer(FakeUpstream):
        async def send(self, events: Sequence[EventRecord]) -> None:
            await super().send(events)
            if len(self.sent) <= 2:
                raise DeliveryFailed("the connection broke before the answer")

    upstream = LostAnswer()
    d = Deliverer(outbox, upstream, RunContexts(wait=0.0), clock=clock)
    with pytest.raises(DeliveryFailed):
        await d.deliver()
    await d.deliver()
    assert len(upstream.sent) == 4 and len(upstream.stored) == 2  # at least once; stored once
    assert upstream.sent[:2] == upstream.sent[2:]


async def test_batches_are_bounded_and_follow_each_other(storage: Storage, clock: FakeClock) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=10))
    for _ in range(4):
        await take(storage)
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock, batch=2)
    assert (await d.deliver())[0] == 0.0  # a full batch: more behind, at once
    assert (await d.deliver())[0] == 0.0
    assert await d.deliver() == (d.idle_seconds, COMMIT)
    assert upstream.sent == await stored_ids(storage)


async def test_one_process_delivers_while_the_other_stands_by(storage: Storage, clock: FakeClock) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    first, second = FakeUpstream(), FakeUpstream()
    a = deliverer(storage, first, clock, owner="a", lease_seconds=15)
    b = deliverer(storage, second, clock, owner="b", lease_seconds=15)
    await a.deliver()
    await take(storage)
    delay, _ = await b.deliver()
    assert (delay, b.stats.delivering, second.sent) == (5.0, False, [])
    await a.deliver()
    assert len(first.sent) == 2
    clock.advance(16)  # a stopped (without freeing its lease): b takes over once it expired
    await take(storage)
    await b.deliver()
    assert b.stats.delivering and len(second.sent) == 1


async def test_a_slot_event_waits_for_its_run_context_briefly(storage: Storage, clock: FakeClock) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    contexts = RunContexts(wait=1.5, clock=clock)
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock, contexts=contexts)
    granted = await take(storage, holder=Holder("task_run", "t1"))
    delay, wake_on = await d.deliver()
    assert [upstream.stored[i].event for i in upstream.sent] == [builders.CREATED]  # the slot event waits
    assert (delay, wake_on) == (1.5, COPY)
    copy = acquired_copy(granted.limits[0].id, "t1", clock())
    assert copy is not None
    contexts.add(copy)
    await d.deliver()  # its copy came: at once, with the flow run
    acquired = upstream.stored[upstream.sent[1]]
    assert {r["prefect.resource.id"] for r in acquired.related} == {
        "prefect.flow-run.fr",
        "prefect.task-run.t1",
    }
    await storage.release_lease(granted.lease_id)
    await d.deliver()  # the released event follows it: the same context, no wait
    released = upstream.stored[upstream.sent[2]]
    assert released.follows == acquired.id
    assert "prefect.flow-run.fr" in {r["prefect.resource.id"] for r in released.related}


async def test_without_its_copy_a_slot_event_goes_once_its_wait_is_over(
    storage: Storage, clock: FakeClock
) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock, contexts=RunContexts(wait=1.5, clock=clock))
    await take(storage)
    await d.deliver()
    assert len(upstream.sent) == 1
    clock.advance(1.5)
    await d.deliver()
    assert len(upstream.sent) == 2


async def test_the_task_restarts_after_a_bug_and_frees_its_lease_when_cancelled(
    storage: Storage, clock: FakeClock
) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))

    class Once(FakeUpstream):
        bugs = 0

        async def send(self, events: Sequence[EventRecord]) -> None:
            if self.bugs == 0:
                self.bugs += 1
                raise RuntimeError("a bug")
            await super().send(events)

    upstream = Once()
    supervisor = Supervisor(max_failures=1, first_delay=0.01)
    d = deliverer(storage, upstream, clock, owner="a", supervisor=supervisor)
    task = asyncio.create_task(d.run())
    async with asyncio.timeout(DEADLINE):
        while not upstream.sent:
            await asyncio.sleep(0.01)
    assert d.stats.restarts == 1
    assert OUTBOX_LOOP in supervisor.problems()  # reported where /api/ready looks
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await storage.outbox_store().claim("b", 10)  # freed: taken at once


def acquired_copy(limit_id: str, task_run: str, seen: float) -> Any:
    """Prefect's client copy of an acquired event of ``limit_id`` by ``task_run``."""
    return client_copy(
        {
            "event": builders.ACQUIRED,
            "resource": {
                "prefect.resource.id": f"prefect.concurrency-limit.{limit_id}",
                "slots-acquired": "1",
            },
            "related": [
                {"prefect.resource.id": "prefect.flow-run.fr", "prefect.resource.role": "flow-run"},
                {"prefect.resource.id": f"prefect.task-run.{task_run}", "prefect.resource.role": "task-run"},
            ],
        },
        seen,
    )


async def test_an_event_held_for_its_context_goes_as_soon_as_its_copy_arrives(
    storage: Storage, clock: FakeClock
) -> None:
    """The clock stands still: only the copy's arrival can let the held event go."""
    storage.outbox_store().enable()
    lim = await storage.create_limit(LimitSpec(name="db", limit=2))
    contexts = RunContexts(wait=1.5, clock=clock)
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock, contexts=contexts, idle_seconds=3600, coalesce=0.0)
    await take(storage, holder=Holder("task_run", "t1"))
    task = asyncio.create_task(d.run())
    try:
        async with asyncio.timeout(DEADLINE):
            while len(upstream.sent) < 1:  # the created event; the acquired one waits
                await asyncio.sleep(0.01)
            contexts.add(acquired_copy(lim.limit.id, "t1", clock()))
            while len(upstream.sent) < 2:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "prefect.flow-run.fr" in {
        r["prefect.resource.id"] for r in upstream.stored[upstream.sent[1]].related
    }


async def test_a_commit_wakes_an_idle_deliverer(storage: Storage, clock: FakeClock) -> None:
    storage.outbox_store().enable()
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock, idle_seconds=3600)
    unsubscribe = storage.subscribe_events(d.committed)
    task = asyncio.create_task(d.run())
    try:
        async with asyncio.timeout(DEADLINE):
            while not d.stats.delivering:
                await asyncio.sleep(0.01)
            await storage.create_limit(LimitSpec(name="db", limit=2))
            while not upstream.sent:
                await asyncio.sleep(0.01)
    finally:
        unsubscribe()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- the upstream's POST /api/events ----------------------------------------------------------------


@pytest.fixture
async def prefect_like() -> AsyncIterator[tuple[str, list[Any], list[Any]]]:
    """A server answering ``POST /api/events`` as Prefect does (204), or as told."""
    bodies: list[Any] = []
    answers: list[Any] = []

    async def events(request: web.Request) -> web.Response:
        bodies.append((request.headers.get("Authorization"), orjson.loads(await request.read())))
        status = answers.pop(0) if answers else 204
        return web.Response(status=status, text="" if status == 204 else "nope")

    app = web.Application()
    app.router.add_post("/api/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/api", bodies, answers
    finally:
        await runner.cleanup()


def _event() -> EventRecord:
    return builders.lifecycle_event(builders.CREATED, LIMIT, 1_800_000_000.0)


async def test_the_endpoint_posts_prefects_event_shape_with_auth(
    prefect_like: tuple[str, list[Any], list[Any]],
) -> None:
    url, bodies, _ = prefect_like
    endpoint = EventsEndpoint(url + "/", auth_string="user:pw")
    event = _event()
    try:
        await endpoint.send([event])
    finally:
        await endpoint.close()
    auth, body = bodies[0]
    assert auth == "Basic " + base64.b64encode(b"user:pw").decode()
    assert body == [orjson.loads(orjson.dumps(wire(event)))]
    assert set(body[0]) == {"occurred", "event", "resource", "related", "payload", "id", "follows"}


async def test_the_endpoint_fails_on_an_error_answer_and_when_unreachable(
    prefect_like: tuple[str, list[Any], list[Any]],
) -> None:
    url, _, answers = prefect_like
    answers.append(500)
    endpoint = EventsEndpoint(url)
    try:
        with pytest.raises(DeliveryFailed, match="500"):
            await endpoint.send([_event()])
    finally:
        await endpoint.close()
    gone = EventsEndpoint(f"http://127.0.0.1:{free_port()}/api", timeout=5)
    try:
        with pytest.raises(DeliveryFailed, match="unreachable"):
            await gone.send([_event()])
    finally:
        await gone.close()


async def test_metrics_report_the_backlog_and_the_delivery(storage: Storage, clock: FakeClock) -> None:
    from slotkeeper.events.broker import Broker
    from slotkeeper.gateway.events_in import SlotCopyFilter
    from slotkeeper.metrics import Metrics

    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=2))
    await take(storage)
    upstream = FakeUpstream()
    d = deliverer(storage, upstream, clock, batch=1)
    metrics = Metrics()
    detach = metrics.attach(storage, Broker(10))
    metrics.attach_outbox(d, SlotCopyFilter(d.contexts))
    try:
        await d.deliver()
        text = (await metrics.scrape()).decode()
    finally:
        detach()
    assert "slotkeeper_outbox_events 1.0" in text
    assert "slotkeeper_outbox_delivered_events_total 1.0" in text
    assert "slotkeeper_outbox_delivering 1.0" in text
    assert "slotkeeper_gateway_slot_copies_dropped_total 0.0" in text


async def test_an_event_the_upstream_refuses_for_good_is_isolated_and_dropped(
    storage: Storage, clock: FakeClock
) -> None:
    storage.outbox_store().enable()
    await storage.create_limit(LimitSpec(name="db", limit=10))
    for _ in range(4):
        await take(storage)
    poison = (await storage.outbox_store().oldest(10))[2].event.id

    class Refusing(FakeUpstream):
        async def send(self, events: Sequence[EventRecord]) -> None:
            if any(e.id == poison for e in events):
                raise DeliveryFailed("422 for one event", 422)
            await super().send(events)

    upstream = Refusing()
    d = deliverer(storage, upstream, clock, batch=4)
    async with asyncio.timeout(DEADLINE):
        while (await storage.outbox_store().backlog()).events:
            with contextlib.suppress(DeliveryFailed):
                await d.deliver()
    assert upstream.sent == [i for i in await stored_ids(storage) if i != poison]  # in order, once
    assert d.stats.refused == 1


async def test_a_copy_received_by_a_process_that_does_not_deliver_reaches_the_one_that_does(
    storage: Storage, clock: FakeClock
) -> None:
    from slotkeeper.gateway.events_in import SlotCopyFilter

    storage.outbox_store().enable()
    lim = await storage.create_limit(LimitSpec(name="db", limit=2))
    upstream = FakeUpstream()
    a = deliverer(
        storage,
        upstream,
        clock,
        owner="a",
        share_copies=True,
        contexts=RunContexts(wait=1.5, clock=clock),
        coalesce=0.0,
    )
    b = deliverer(
        storage,
        FakeUpstream(),
        clock,
        owner="b",
        share_copies=True,
        contexts=RunContexts(wait=1.5, clock=clock),
        coalesce=0.0,
    )
    await a.deliver()  # a delivers (it holds the lease)
    await b.deliver()  # b stands by
    await take(storage, holder=Holder("task_run", "t1"))
    await a.deliver()
    assert len(upstream.sent) == 1  # the acquired event waits for its copy
    on_b = SlotCopyFilter(b.contexts, clock=clock, share=b.received)
    copy = acquired_copy(lim.limit.id, "t1", clock())
    assert copy is not None
    frame = {
        "event": copy.event,
        "resource": {
            "prefect.resource.id": f"prefect.concurrency-limit.{lim.limit.id}",
            "slots-acquired": "1",
        },
        "related": [dict(r) for r in copy.context],
    }
    assert await on_b(orjson.dumps(frame).decode()) is None  # the client's socket reached b
    async with asyncio.timeout(DEADLINE):
        while b._sharing is None or not b._sharing.done():
            await asyncio.sleep(0.01)
    await a.deliver()
    assert "prefect.flow-run.fr" in {
        r["prefect.resource.id"] for r in upstream.stored[upstream.sent[1]].related
    }
