"""Events through the gateway against a real Prefect 3.8.8 server (issue 15, item 2).

``prefect server start`` from ``.venv-prefect`` is the upstream; ``slotkeeper server start`` with
``SLOTKEEPER_UPSTREAM_URL`` stands in front of it; a flow runs with Prefect's own client pointed
at the gateway. Checked against Prefect's own store (read from the upstream directly):

* every event slotkeeper committed for the flow's limits is stored there once, under the id
  slotkeeper gave it, and Prefect's client copies are not (they would have other ids);
* slot events carry the run context Prefect's own would (flow run; task run for tag limits);
* flow-run and task-run events are readable through the gateway, once each, and ``next_page``
  links point at the gateway;
* the upstream killed mid-run: acquisitions go on, forwarded calls fail cleanly, and once it is
  back every slot event reaches it, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from tests.compat.conftest import (  # fixtures: importing them here makes them this module's
    PREFECT_VENV,
    RunPrefect,
    Server,
    prefect_home,
    prefect_python,
    results,
    run_prefect,
    running_server,
    value,
    wait_for,
)
from tests.conftest import clean_env, free_port

__all__ = ["prefect_home", "prefect_python", "run_prefect"]

#: Bounds for slow machines, never expectations.
STARTUP_SECONDS = 120.0
ARRIVAL_SECONDS = 60.0
SLOT_PREFIX = "prefect.concurrency-limit."


class PrefectServer:
    """``prefect server start`` on a free port, its own PREFECT_HOME and SQLite database;
    ``kill()`` then ``start()``: a crash and a return (same port, same database)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "prefect.log"
        self.env = clean_env(
            ("PREFECT_", "SLOTKEEPER_"),
            PREFECT_HOME=str(home),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            # Stored every 5 s by default; the tests read Prefect's store.
            PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="0.5",
            PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL="0.5",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(PREFECT_VENV / "bin" / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"Prefect's server did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as answer:
                return bool(json.loads(answer.read()) is True)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL to its whole process group: a crash."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
            self.process = None

    def events(self, event_filter: dict[str, Any]) -> list[dict[str, Any]]:
        """Every event of Prefect's own store matching ``event_filter``, oldest first."""
        return read_events(self.http, event_filter)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.http.close()


def read_events(http: httpx.Client, event_filter: dict[str, Any], limit: int = 50) -> list[dict[str, Any]]:
    """Every event matching ``event_filter`` through ``http``, following ``next_page``."""
    answer = http.post("/events/filter", json={"filter": {"order": "ASC", **event_filter}, "limit": limit})
    assert answer.status_code == 200, answer.text
    page = answer.json()
    found: list[dict[str, Any]] = list(page["events"])
    while page["next_page"]:
        answer = http.get(page["next_page"])
        assert answer.status_code == 200, answer.text
        page = answer.json()
        found.extend(page["events"])
    return found


def committed(gateway: Server, resource_ids: list[str]) -> dict[str, str]:
    """The events slotkeeper committed for these resources: id -> event name (its own store)."""
    with contextlib.closing(
        sqlite3.connect(f"file:{gateway.home / 'slotkeeper.db'}?mode=ro", uri=True)
    ) as db:
        marks = ",".join("?" * len(resource_ids))
        rows = db.execute(f"SELECT id, event FROM events WHERE resource_id IN ({marks})", resource_ids)
        return dict(rows.fetchall())


def waiting_in_outbox(gateway: Server) -> int:
    with contextlib.closing(
        sqlite3.connect(f"file:{gateway.home / 'slotkeeper.db'}?mode=ro", uri=True)
    ) as db:
        count: int = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return count


def related_ids(event: dict[str, Any]) -> set[str]:
    return {r["prefect.resource.id"] for r in event["related"]}


@pytest.fixture(scope="module")
def upstream(prefect_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with PrefectServer(tmp_path_factory.mktemp("prefect-upstream")) as server:
        yield server


@pytest.fixture(scope="module")
def server(upstream: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The gateway (under the name tests/compat's ``run_prefect`` targets)."""
    settings = {"SLOTKEEPER_UPSTREAM_URL": upstream.url, "SLOTKEEPER_OUTBOX_MAX_BACKOFF_SECONDS": "1"}
    with running_server(tmp_path_factory.mktemp("gateway"), settings=settings) as gateway:
        yield gateway


FLOW = """
from prefect import flow, task
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context

TAG, NAME = "@TAG@", "@NAME@"

@task(tags=[TAG])
def tagged(i):
    return str(get_run_context().task_run.id)

@task
def guarded(i):
    with concurrency(NAME, occupy=1):
        return str(get_run_context().task_run.id)

@flow
def work():
    ids = [tagged(i) for i in range(2)] + [guarded(i) for i in range(2)]
    return str(get_run_context().flow_run.id), ids

check("run", work)
finish()
"""


def test_slot_events_reach_the_upstream_once_with_their_ids_and_run_context(
    server: Server, upstream: PrefectServer, run_prefect: RunPrefect
) -> None:
    gateway, suffix = server, uuid.uuid4().hex[:8]
    tag, name = f"db{suffix}", f"api{suffix}"
    limits = {}
    for limit_name in (f"tag:{tag}", name):
        answer = gateway.http.post("/v2/concurrency_limits/", json={"name": limit_name, "limit": 1})
        assert answer.status_code == 201, answer.text
        limits[limit_name] = answer.json()["id"]
    script = FLOW.replace("@TAG@", tag).replace("@NAME@", name)
    found = results(run_prefect(script, timeout=300))  # generous: the machine may be loaded
    flow_run, task_runs = value(found, "run")
    resources = [f"{SLOT_PREFIX}{i}" for i in limits.values()]
    mine = committed(gateway, resources)
    assert sorted(mine.values()).count("prefect.concurrency-limit.acquired") == 4

    def delivered() -> list[dict[str, Any]] | None:
        events = upstream.events({"resource": {"id": resources}})
        return events if len(events) >= len(mine) else None

    stored = wait_for(delivered, timeout=ARRIVAL_SECONDS, interval=0.25)
    # Once each, under slotkeeper's ids: no client copy (they have ids of their own) got through.
    assert sorted(e["id"] for e in stored) == sorted(mine)
    slot_events = [
        e
        for e in stored
        if e["event"] in ("prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released")
    ]
    assert len(slot_events) == 8
    # Run context: the flow run on every slot event; for the tag limit (the task engine names
    # its task run as the lease's holder) the task run too, exactly.
    for event in slot_events:
        assert f"prefect.flow-run.{flow_run}" in related_ids(event), event
    tag_events = [e for e in slot_events if e["resource"]["prefect.resource.id"] == resources[0]]
    assert {
        tr for e in tag_events for tr in task_runs[:2] if f"prefect.task-run.{tr}" in related_ids(e)
    } == set(task_runs[:2])
    assert all(len({r for r in related_ids(e) if r.startswith("prefect.task-run.")}) == 1 for e in tag_events)
    # The released events follow their acquired events, as slotkeeper wrote them.
    ids = {e["id"] for e in slot_events}
    assert all(e["follows"] in ids for e in slot_events if e["event"].endswith("released"))

    # Flow-run and task-run events through the gateway: once each, as the upstream holds them.
    through = read_events(gateway.http, {"any_resource": {"id": [f"prefect.flow-run.{flow_run}"]}}, limit=5)
    direct = upstream.events({"any_resource": {"id": [f"prefect.flow-run.{flow_run}"]}})
    assert [e["id"] for e in through] == [e["id"] for e in direct]
    assert len({e["id"] for e in through}) == len(through)
    names = {e["event"] for e in through}
    assert {"prefect.flow-run.Completed", "prefect.task-run.Completed"} <= names
    task_completed = [e for e in through if e["event"] == "prefect.task-run.Completed"]
    assert sorted(e["resource"]["prefect.resource.id"] for e in task_completed) == sorted(
        f"prefect.task-run.{t}" for t in task_runs
    )
    # next_page links point at the gateway (Prefect builds them from the request's Host).
    page = gateway.http.post(
        "/events/filter",
        json={"filter": {"any_resource": {"id": [f"prefect.flow-run.{flow_run}"]}}, "limit": 1},
    )
    assert page.status_code == 200
    assert page.json()["next_page"].startswith(f"http://127.0.0.1:{gateway.port}/api/events/filter/next")
    assert wait_for(lambda: waiting_in_outbox(gateway) == 0, timeout=ARRIVAL_SECONDS)


def test_an_upstream_down_delays_slot_events_and_loses_none(server: Server, upstream: PrefectServer) -> None:
    gateway = server
    name = f"down{uuid.uuid4().hex[:8]}"
    answer = gateway.http.post("/v2/concurrency_limits/", json={"name": name, "limit": 1})
    assert answer.status_code == 201, answer.text
    resource = f"{SLOT_PREFIX}{answer.json()['id']}"
    upstream.kill()
    try:
        for _ in range(3):  # concurrency goes on without the upstream
            granted = gateway.http.post(
                "/v2/concurrency_limits/increment-with-lease",
                json={"names": [name], "slots": 1, "lease_duration": 60},
            )
            assert granted.status_code == 200, granted.text
            released = gateway.http.post(
                "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": granted.json()["lease_id"]}
            )
            assert released.status_code == 204, released.text
        forwarded = gateway.http.post("/flows/filter", json={})
        assert forwarded.status_code == 502
        assert forwarded.json()["code"] == "upstream_unavailable"
        assert waiting_in_outbox(gateway) >= 7  # created, and 3 pairs
    finally:
        upstream.start()
    mine = committed(gateway, [resource])
    assert len(mine) == 7
    stored = wait_for(
        lambda: (e := upstream.events({"resource": {"id": [resource]}})) and len(e) >= 7 and e,
        timeout=ARRIVAL_SECONDS,
        interval=0.25,
    )
    assert sorted(e["id"] for e in stored) == sorted(mine)
    assert wait_for(lambda: waiting_in_outbox(gateway) == 0, timeout=ARRIVAL_SECONDS)
