"""Events with Prefect's client: the server's slot events, the client's copies, live streaming.

Around a ``concurrency()`` block the server writes ``prefect.concurrency-limit.acquired`` and
``.released`` itself; Prefect's client sends its own copies over ``/api/events/in``, which the
server acknowledges and does not store. The scripts record the copies the client really emitted
(``prefect.concurrency._events.emit_event`` wrapped, still called) so the tests can show they
reached the server and were dropped. Then Prefect's events subscriber and events client are used
on a plain server and on one with an auth string.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import RunPrefect, Server, error, results, running_server, value, wait_for

pytestmark = pytest.mark.slow

ACQUIRED = "prefect.concurrency-limit.acquired"
RELEASED = "prefect.concurrency-limit.released"
AUTH = "compat:s3cret"

#: Prepended to scripts: keep every slot event Prefect's client emits (it is still sent).
RECORD_COPIES = """
import prefect.concurrency._events as _client_events

COPIES = []
_emit = _client_events.emit_event


def _recording_emit(*args, **kwargs):
    event = _emit(*args, **kwargs)
    COPIES.append(None if event is None else event.model_dump(mode="json"))
    return event


_client_events.emit_event = _recording_emit
"""

SLOT_EVENTS_SCRIPT = (
    RECORD_COPIES
    + """
from prefect.concurrency.asyncio import concurrency as aconcurrency
from prefect.concurrency.sync import concurrency, rate_limit
from prefect.events import emit_event
from prefect.events.worker import EventsWorker

with concurrency(["ev-b", "ev-a"], occupy=2):
    pass


async def main():
    async with aconcurrency("ev-c"):
        pass

asyncio.run(main())

with concurrency("ev-off"):  # an inactive limit: listed, not counted, still has its events
    pass
rate_limit("ev-rate", occupy=2)  # slots that decay: acquired, never released

# Sent after the copies on the same worker and socket: once it is stored, so were they.
marker = emit_event("slotkeeper.compat.marker", resource={"prefect.resource.id": f"slotkeeper.compat.{uuid.uuid4()}"})
check("drained", lambda: [len(futures) for futures in EventsWorker.drain_all(timeout=30)])
RESULTS["copies"] = {"value": COPIES}
RESULTS["marker"] = {"value": None if marker is None else str(marker.id)}

# Read the slot events back through Prefect's client (REST), two per page.
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventIDFilter, EventNameFilter, EventOrder, EventResourceFilter

slot_filter = EventFilter(
    event=EventNameFilter(name=["prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released"]),
    resource=EventResourceFilter(id_prefix=["prefect.concurrency-limit."]),
    order=EventOrder.ASC,
)


def read_pages():
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 20
        while not client.read_events(EventFilter(id=EventIDFilter(id=[marker.id])), limit=1).events:
            assert time.monotonic() < deadline, "the marker event was never stored"
            time.sleep(0.1)
        page = client.read_events(slot_filter, limit=2)
        total, pages = page.total, []
        while True:
            pages.append([[e.event, e.resource.name, str(e.id)] for e in page.events])
            if page.next_page is None:
                return {"total": total, "pages": pages, "type": type(page).__name__}
            page = client.read_events_page(page.next_page)


def read_default_limit():
    # read_events() asks for 100 a page; Prefect's server, like slotkeeper, serves at most 50.
    with get_client(sync_client=True) as client:
        client.read_events(slot_filter)


check("read_pages", read_pages)
check("read_default_limit", read_default_limit)
finish()
"""
)

#: Subscribes, then acquires and releases ``LIMIT`` and sends a custom event with the events
#: client; records what the subscriber received. Env: LIMIT, LIMIT_ID, CUSTOM_RESOURCE.
LIVE_SCRIPT = (
    RECORD_COPIES
    + """
from datetime import datetime, timezone

from prefect.concurrency.asyncio import concurrency
from prefect.events import Event
from prefect.events.clients import get_events_client, get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

LIMIT, LIMIT_ID = os.environ["LIMIT"], os.environ["LIMIT_ID"]
CUSTOM_RESOURCE = os.environ["CUSTOM_RESOURCE"]
CUSTOM = "slotkeeper.compat.custom"


async def work():
    await asyncio.sleep(0.3)
    async with concurrency(LIMIT, occupy=1):
        await asyncio.sleep(0.2)
    custom = Event(
        event=CUSTOM,
        resource={"prefect.resource.id": CUSTOM_RESOURCE, "prefect.resource.name": "custom thing"},
        related=[{"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}", "prefect.resource.role": "flow-run"}],
        payload={"answer": 42, "nested": {"list": [1, 2.5, None, "x"]}},
    )
    RESULTS["custom"] = {"value": custom.model_dump(mode="json")}
    async with get_events_client() as client:
        RESULTS["events_client"] = {"value": type(client).__name__}
        await client.emit(custom)


async def main():
    event_filter = EventFilter(
        event=EventNameFilter(name=["prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released", CUSTOM]),
        resource=EventResourceFilter(id=[f"prefect.concurrency-limit.{LIMIT_ID}", CUSTOM_RESOURCE]),
    )
    # Before subscribing: these two come from the backfill (the subscriber asks for the last minute).
    async with concurrency(LIMIT, occupy=2):
        pass
    RESULTS["before"] = {"value": datetime.now(timezone.utc).isoformat()}
    received = []
    async with get_events_subscriber(filter=event_filter) as subscriber:
        RESULTS["subscriber"] = {"value": type(subscriber).__name__}
        subscribed = datetime.now(timezone.utc)
        worker = asyncio.create_task(work())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            # Five events are expected; then wait a little longer for any duplicate.
            wait = 1.5 if len(received) >= 5 else deadline - loop.time()
            try:
                event = await asyncio.wait_for(subscriber.__anext__(), timeout=wait)
            except TimeoutError:
                break
            received.append(event.model_dump(mode="json"))
        await worker
    RESULTS["subscribed"] = {"value": subscribed.isoformat()}
    RESULTS["received"] = {"value": received}


asyncio.run(main())
RESULTS["copies"] = {"value": COPIES}
"""
)

#: Extra checks on a server with an auth string: a wrong one is refused, by HTTP and websocket.
WRONG_AUTH_SCRIPT = """
from prefect.client.orchestration import get_client
from prefect.events.clients import get_events_subscriber
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings


async def read_with_wrong_auth():
    async with get_client() as client:
        await client.read_global_concurrency_limit_by_name(LIMIT)


async def subscribe_with_wrong_auth():
    async with get_events_subscriber(reconnection_attempts=0):
        pass


async def wrong():
    with temporary_settings({PREFECT_API_AUTH_STRING: "compat:wrong"}):
        await acheck("wrong_auth_http", read_with_wrong_auth)
        await acheck("wrong_auth_subscriber", subscribe_with_wrong_auth)

asyncio.run(wrong())
"""


def _limits(server: Server, limits: dict[str, dict[str, Any]]) -> dict[str, str]:
    ids = {}
    for name, fields in limits.items():
        answer = server.http.post("/v2/concurrency_limits/", json={"name": name, **fields})
        assert answer.status_code == 201, answer.text
        ids[name] = answer.json()["id"]
    return ids


def _resource_id(limit_id: str) -> str:
    return f"prefect.concurrency-limit.{limit_id}"


def _slot_events(server: Server, limit_id: str) -> list[dict[str, Any]]:
    return server.events(
        {"event": {"name": [ACQUIRED, RELEASED]}, "resource": {"id": [_resource_id(limit_id)]}}
    )


def _stored(server: Server, event_id: str) -> list[dict[str, Any]]:
    return server.events({"id": {"id": [event_id]}})


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- slot events around concurrency(): the server's, once --------------------------------------

SLOT_LIMITS: dict[str, dict[str, Any]] = {
    "ev-a": {"limit": 3},
    "ev-b": {"limit": 3},
    "ev-c": {"limit": 1},
    "ev-off": {"limit": 1, "active": False},
    "ev-rate": {"limit": 4, "slot_decay_per_second": 1.0},
}


@pytest.fixture(scope="module")
def slot_run(server: Server, run_prefect: RunPrefect) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    ids = _limits(server, SLOT_LIMITS)
    found = results(run_prefect(SLOT_EVENTS_SCRIPT))
    marker = value(found, "marker")
    assert marker, "Prefect's client emitted no event: is PREFECT_API_URL set?"
    wait_for(lambda: _stored(server, marker))  # the client's socket has been read to the end
    return ids, found


def test_client_sent_its_copies_and_they_were_not_stored(
    server: Server, slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]]
) -> None:
    _, found = slot_run
    assert value(found, "drained")[1] == 0  # no worker left with events unsent
    copies = value(found, "copies")
    # The client really emitted its copies: 2 limits x (acquired, released), 1 x 2 twice,
    # then the rate limit's acquired alone.
    assert all(copy is not None for copy in copies), copies
    assert [(copy["event"], copy["resource"]["prefect.resource.name"]) for copy in copies] == [
        (ACQUIRED, "ev-a"),
        (ACQUIRED, "ev-b"),
        (RELEASED, "ev-a"),
        (RELEASED, "ev-b"),
        (ACQUIRED, "ev-c"),
        (RELEASED, "ev-c"),
        (ACQUIRED, "ev-off"),
        (RELEASED, "ev-off"),
        (ACQUIRED, "ev-rate"),
    ]
    assert server.events({"id": {"id": [copy["id"] for copy in copies]}}) == []


@pytest.mark.parametrize("name", ["ev-a", "ev-b", "ev-c", "ev-off"])
def test_one_acquired_and_one_released_per_limit(
    server: Server, slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]], name: str
) -> None:
    ids, _ = slot_run
    events = _slot_events(server, ids[name])
    assert [e["event"] for e in events] == [ACQUIRED, RELEASED]
    acquired, released = events
    assert released["follows"] == acquired["id"]
    assert acquired["follows"] is None
    assert uuid.UUID(acquired["id"]).version == 7
    assert _time(acquired["occurred"]) <= _time(released["occurred"])


@pytest.mark.parametrize(
    ("name", "others", "slots"),
    [("ev-a", ["ev-b"], 2), ("ev-b", ["ev-a"], 2), ("ev-c", [], 1), ("ev-off", [], 1), ("ev-rate", [], 2)],
)
def test_slot_event_labels(
    server: Server,
    slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]],
    name: str,
    others: list[str],
    slots: int,
) -> None:
    ids, found = slot_run
    limit = SLOT_LIMITS[name]["limit"]
    events = _slot_events(server, ids[name])
    assert events
    for event in events:
        assert event["resource"] == {
            "prefect.resource.id": _resource_id(ids[name]),
            "prefect.resource.name": name,
            "slots-acquired": str(slots),
            "limit": str(limit),
        }
        assert event["related"] == [
            {"prefect.resource.id": _resource_id(ids[other]), "prefect.resource.role": "concurrency-limit"}
            for other in others
        ]
        assert event["payload"] == {}
        # Exactly what Prefect's client would have recorded itself.
        copy = next(
            c
            for c in value(found, "copies")
            if c["event"] == event["event"] and c["resource"]["prefect.resource.name"] == name
        )
        assert copy["resource"] == event["resource"]
        assert copy["related"] == event["related"]
        assert copy["payload"] == event["payload"]


def test_rate_limit_has_an_acquired_event_only(
    server: Server, slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]]
) -> None:
    ids, _ = slot_run
    (acquired,) = _slot_events(server, ids["ev-rate"])
    assert acquired["event"] == ACQUIRED
    assert acquired["resource"]["slots-acquired"] == "2"


def test_marker_event_from_emit_event_is_stored(
    server: Server, slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]]
) -> None:
    _, found = slot_run
    (marker,) = _stored(server, value(found, "marker"))
    assert marker["event"] == "slotkeeper.compat.marker"
    assert marker["resource"]["prefect.resource.id"].startswith("slotkeeper.compat.")
    assert marker["received"]


# --- Prefect's subscriber and events client ------------------------------------------------------


def _live(server: Server, run_prefect: RunPrefect, limit: str, extra: str = "") -> dict[str, dict[str, Any]]:
    (limit_id,) = _limits(server, {limit: {"limit": 2}}).values()
    custom_resource = f"slotkeeper.compat.thing.{uuid.uuid4()}"
    env = {"LIMIT": limit, "LIMIT_ID": limit_id, "CUSTOM_RESOURCE": custom_resource}
    found = results(run_prefect(LIVE_SCRIPT + extra + "\nfinish()\n", env, server=server))
    found["limit_id"] = {"value": limit_id}
    return found


def _check_live(server: Server, found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "subscriber") == "PrefectEventSubscriber"
    assert value(found, "events_client") == "PrefectEventsClient"
    received = value(found, "received")
    names = [e["event"] for e in received]
    assert names == [ACQUIRED, RELEASED, ACQUIRED, RELEASED, "slotkeeper.compat.custom"], names
    # The first block ended before the subscription (backfill), the rest came live.
    before, subscribed = _time(value(found, "before")), _time(value(found, "subscribed"))
    assert all(_time(e["occurred"]) <= before for e in received[:2])
    assert all(_time(e["occurred"]) >= subscribed for e in received[2:])
    assert [e["resource"]["slots-acquired"] for e in received[:4]] == ["2", "2", "1", "1"]
    # The server's own events, once each, not the client's copies.
    copy_ids = {c["id"] for c in value(found, "copies")}
    assert len(copy_ids) == 4
    assert len({e["id"] for e in received}) == 5
    assert not copy_ids & {e["id"] for e in received}
    for acquired, released in (received[0:2], received[2:4]):
        assert acquired["resource"]["prefect.resource.id"] == _resource_id(value(found, "limit_id"))
        assert released["follows"] == acquired["id"]
    custom = received[4]
    # The custom event arrives as sent, and is stored as sent.
    sent = value(found, "custom")
    assert custom["id"] == sent["id"]
    (stored,) = wait_for(lambda: _stored(server, sent["id"]))
    for event in (custom, stored):
        assert event["event"] == sent["event"]
        assert event["resource"] == sent["resource"]
        assert event["related"] == sent["related"]
        assert event["payload"] == {"answer": 42, "nested": {"list": [1, 2.5, None, "x"]}}
        assert _time(event["occurred"]) == _time(sent["occurred"])
    assert stored["received"]


def test_subscriber_streams_slot_events_live_and_events_client_emits(
    server: Server, run_prefect: RunPrefect
) -> None:
    _check_live(server, _live(server, run_prefect, "live"))


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home: Path = tmp_path_factory.mktemp("slotkeeper-auth-home")
    with running_server(home, auth=AUTH) as running:
        yield running


def test_with_an_auth_string(auth_server: Server, run_prefect: RunPrefect) -> None:
    """PREFECT_API_AUTH_STRING = SLOTKEEPER_API_AUTH_STRING: HTTP, /events/in and /events/out work."""
    found = _live(auth_server, run_prefect, "guarded", WRONG_AUTH_SCRIPT)
    _check_live(auth_server, found)
    refused = error(found, "wrong_auth_http")
    assert "HTTPStatusError" in refused["mro"]
    assert refused["message"].startswith("Client error '401 Unauthorized'"), refused["message"]
    refused = error(found, "wrong_auth_subscriber")
    assert "Unable to authenticate to the event stream" in refused["message"]
    assert "Invalid token" in refused["message"]


def test_prefect_client_reads_and_pages_events(
    server: Server, slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]]
) -> None:
    ids, found = slot_run
    read = value(found, "read_pages")
    assert read["type"] == "EventPage"
    assert read["total"] == 9
    assert [len(page) for page in read["pages"]] == [2, 2, 2, 2, 1]
    through_client = [event for page in read["pages"] for event in page]
    direct = [
        [e["event"], e["resource"]["prefect.resource.name"], e["id"]]
        for e in server.events(
            {
                "event": {"name": [ACQUIRED, RELEASED]},
                "resource": {"id": [_resource_id(i) for i in ids.values()]},
            }
        )
    ]
    assert through_client == direct


def test_read_events_default_page_size_is_refused_as_by_prefect(
    slot_run: tuple[dict[str, str], dict[str, dict[str, Any]]],
) -> None:
    """Prefect's ``read_events()`` defaults to ``limit=100``; its server (and slotkeeper) allow 50."""
    _, found = slot_run
    refused = error(found, "read_default_limit")
    assert "HTTPStatusError" in refused["mro"]
    assert refused["message"].startswith("Client error '422 Unprocessable Entity'"), refused["message"]
