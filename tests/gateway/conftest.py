"""End to end through the gateway (issue 15): a real Prefect 3.8.8 server as the upstream,
``slotkeeper server start`` with ``SLOTKEEPER_UPSTREAM_URL`` in front of it, and Prefect's own
client pointed at the gateway.

* ``upstream`` (session): ``prefect server start`` from ``.venv-prefect`` on a free port, with its
  own ``PREFECT_HOME`` and SQLite database in a temporary folder, in its own process group (a
  stop reaches any helper it starts). ``kill()`` then ``start()`` is a crash and a return: same
  port, same database. One per session: it takes seconds to start.
* ``gateway`` (module): slotkeeper on SQLite in front of ``upstream``; ``server`` is the same
  process, under the name the runners below target.
* ``run_prefect`` / ``start_prefect`` / ``prefect_python``: tests/compat's runners (PRELUDE,
  ``check``/``finish``, ``results``), here pointed at the gateway.

Nothing waits unbounded: every start has a deadline, every script and HTTP call a timeout; the
processes are stopped with SIGTERM then SIGKILL, never SIGINT (a suite run from a background
script ignores it, and its children inherit that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from slotkeeper.events.models import (
    EventFilter,
    EventNameFilter,
    EventOrder,
    EventRecord,
    EventResourceFilter,
)
from slotkeeper.storage import Storage, open_storage
from tests.compat.conftest import (  # the runners are fixtures: importing them here shares them
    PREFECT_VENV,
    Server,
    prefect_home,
    prefect_python,
    read_events,
    run_prefect,
    running_server,
    start_prefect,
    wait_for,
)
from tests.conftest import ServerProcess, clean_env

__all__ = ["prefect_home", "prefect_python", "run_prefect", "start_prefect"]

PREFECT = str(PREFECT_VENV / "bin" / "prefect")
T = TypeVar("T")
#: Bound on the upstream's start (its first start migrates its database): for a slow machine.
UPSTREAM_STARTUP_SECONDS = 120.0
ACQUIRED = "prefect.concurrency-limit.acquired"
RELEASED = "prefect.concurrency-limit.released"
#: Bound on its stop before it is killed (its state is on disk: a kill loses nothing we read).
UPSTREAM_STOP_SECONDS = 5.0


class PrefectServer(ServerProcess):
    """``prefect server start`` on a free port, on SQLite under ``home``, leading its own process
    group (a stop reaches any helper it starts).

    ``with PrefectServer(...) as upstream`` starts it and stops it at the end; in between a test
    may ``kill()`` it (SIGKILL to its whole group, as a crash) and ``start()`` it again: same
    port, same database. ``http`` is an HTTP client on its API (no gateway in between).
    """

    name = "Prefect's server"
    startup_seconds = UPSTREAM_STARTUP_SECONDS
    own_group = True

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.log = home / "prefect-server.log"
        self.env = clean_env(
            ("PREFECT_", "SLOTKEEPER_"),
            PREFECT_HOME=str(home),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            # Events and task runs are stored in batches, every 5 s by default: tests read them.
            PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="0.5",
            PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL="0.5",
            PYTHONUNBUFFERED="1",
        )
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def command(self) -> list[str]:
        return [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """Kill it at once (SIGKILL to the group): a crash."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=UPSTREAM_STOP_SECONDS)
        self.process = None

    def stop(self) -> None:
        """Stop it (SIGTERM to the group, SIGKILL if it outlives the bound)."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=UPSTREAM_STOP_SECONDS)
        self.kill()  # also whatever of its group outlived it

    def events(self, event_filter: dict[str, Any], limit: int = 50) -> list[dict[str, Any]]:
        """Every event in Prefect's own store matching ``event_filter``, oldest first."""
        return read_events(self.http, event_filter, limit)


@pytest.fixture(scope="package")
def upstream(prefect_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server for these tests (they name their flows and limits uniquely), stopped when
    they are done: an idle Prefect server keeps half a core busy, which the rest of the suite needs."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-upstream"))
    try:
        with server:
            yield server
    finally:
        server.http.close()


@contextlib.contextmanager
def running_gateway(
    home: Path, upstream: PrefectServer, settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """slotkeeper as a gateway in front of ``upstream`` (on SQLite under ``home`` unless
    ``settings`` name another database), until the block ends."""
    with running_server(home, settings={"SLOTKEEPER_UPSTREAM_URL": upstream.url, **(settings or {})}) as gw:
        yield gw


@pytest.fixture(scope="module")
def gateway(upstream: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The gateway in front of the package's upstream, one per module."""
    with running_gateway(tmp_path_factory.mktemp("gateway-home"), upstream) as gw:
        yield gw


@pytest.fixture(scope="module")
def server(gateway: Server) -> Server:
    """The gateway, under the name tests/compat's ``run_prefect`` and ``start_prefect`` target."""
    return gateway


def _read_storage(gateway: Server, read: Callable[[Storage], Awaitable[T]]) -> T:
    """``read`` over the gateway's own database (its SQLite file, or the PostgreSQL database its
    settings name), opened beside the running server."""

    async def run() -> T:
        url = gateway.env.get("SLOTKEEPER_DATABASE_URL") or f"sqlite:///{gateway.home / 'slotkeeper.db'}"
        storage = open_storage(url)
        try:
            return await read(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def own_slot_events(gateway: Server, resource_id: str) -> list[EventRecord]:
    """The slot events slotkeeper stored itself for one limit (``prefect.concurrency-limit.<id>``),
    oldest first: read from its database, since the gateway forwards events queries to Prefect's
    server."""
    event_filter = EventFilter(
        event=EventNameFilter(name=[ACQUIRED, RELEASED]),
        resource=EventResourceFilter(id=[resource_id]),
        order=EventOrder.ASC,
    )

    async def read(storage: Storage) -> list[EventRecord]:
        found, _ = await storage.event_store().query(event_filter, limit=10_000, with_total=False)
        return found

    return _read_storage(gateway, read)


def outbox_backlog(gateway: Server) -> int:
    """How many events wait in the gateway's outbox for the upstream."""

    async def read(storage: Storage) -> int:
        return (await storage.outbox_store().backlog()).events

    return _read_storage(gateway, read)


def take_and_give_back(gateway: Server, name: str) -> None:
    """One slot of ``name`` taken under a lease and given back, with plain HTTP."""
    lease = gateway.http.post(
        "/v2/concurrency_limits/increment-with-lease",
        json={"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60},
    )
    assert lease.status_code == 200, lease.text
    released = gateway.http.post(
        "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease.json()["lease_id"]}
    )
    assert released.status_code == 204, released.text


def outbox_drained(gateway: Server, upstream: PrefectServer) -> None:
    """Wait until every slot event ``gateway`` committed so far is in ``upstream``'s store.

    Takes and gives back a slot of a limit of its own through the gateway, then waits until
    Prefect's store has that released event: the outbox delivers in order, so the events
    committed before it have been delivered too (and Prefect stores what it receives in order).
    """
    name = f"sentinel-{uuid.uuid4().hex[:8]}"
    assert gateway.http.post("/v2/concurrency_limits/", json={"name": name, "limit": 1}).status_code == 201
    take_and_give_back(gateway, name)
    limit_id = gateway.http.get(f"/v2/concurrency_limits/{name}").json()["id"]
    wait_for(
        lambda: upstream.events(
            {"event": {"name": [RELEASED]}, "resource": {"id": [f"prefect.concurrency-limit.{limit_id}"]}}
        ),
        timeout=60,
        interval=0.25,
    )
    # And the outbox lets go of what it delivered (a row goes once the upstream took its batch).
    wait_for(lambda: outbox_backlog(gateway) == 0, timeout=60, interval=0.25)


def subscribe(gateway: Server, event_filter: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The first ``count`` events of a subscription to ``/api/events/out`` through the gateway,
    as Prefect's events subscriber makes it (auth, then the filter with backfill: the stored
    events come first)."""
    url = "ws" + gateway.url.removeprefix("http") + "/events/out"
    events: list[dict[str, Any]] = []
    with connect(url, subprotocols=[Subprotocol("prefect")], open_timeout=10) as socket:
        socket.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(socket.recv(timeout=10)) == {"type": "auth_success"}
        socket.send(json.dumps({"type": "filter", "filter": event_filter, "backfill": True}))
        while len(events) < count:
            message = json.loads(socket.recv(timeout=60))
            assert message["type"] == "event", message
            events.append(message["event"])
    return events
