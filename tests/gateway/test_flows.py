"""Prefect flows through the gateway: tagged tasks on a tag limit, ``concurrency()`` in tasks.

One script, with Prefect's client pointed at the gateway, creates the limits with Prefect's client
(the tag limit ``db`` of 2 and the global limit ``api`` of 2) and runs two flows of six tasks each:
one whose tasks are tagged ``db`` (Prefect's task engine takes a lease on ``tag:db`` for each),
one whose tasks enter ``concurrency("api", occupy=1)``. Each task body counts, under a lock, how
many bodies of its flow are inside at once. The tests then read what the flows left behind:
slotkeeper's own slot events (in its database), the same events in Prefect's store (delivered by
the gateway's outbox, with the runs' context), and the runs' own events through the gateway.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.compat.conftest import RunPrefect, Server, results, value, wait_for
from tests.gateway.conftest import (
    ACQUIRED,
    RELEASED,
    PrefectServer,
    outbox_drained,
    own_slot_events,
    subscribe,
)

pytestmark = pytest.mark.slow

TASKS = 6
LIMIT = 2
TAG = "db"
API = "api"
#: The state events of one flow run and of one task run that run to completion (sorted).
FLOW_RUN_EVENTS = sorted(f"prefect.flow-run.{s}" for s in ("Pending", "Running", "Completed"))
HEARTBEAT = "prefect.flow-run.heartbeat"
TASK_RUN_EVENTS = sorted(f"prefect.task-run.{s}" for s in ("Pending", "Running", "Completed"))

FLOWS_SCRIPT = """
import threading
from contextlib import contextmanager

from prefect import flow, get_client, task
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

TAG, API, LIMIT, TASKS = os.environ["TAG"], os.environ["API"], int(os.environ["LIMIT"]), int(os.environ["TASKS"])
MARKER = os.environ["MARKER"]
lock = threading.Lock()
inside = {"db": 0, "api": 0}
most = {"db": 0, "api": 0}


@contextmanager
def counted(key):
    with lock:
        inside[key] += 1
        most[key] = max(most[key], inside[key])
    try:
        time.sleep(0.2)
        yield
    finally:
        with lock:
            inside[key] -= 1


@task(tags=[TAG])
def db_task(i):
    with counted("db"):
        return str(task_run.id)


@task
def api_task(i):
    with concurrency(API, occupy=1):
        with counted("api"):
            return str(task_run.id)


@flow(task_runner=ThreadPoolTaskRunner(max_workers=TASKS))
def tagged():
    futures = [db_task.submit(i) for i in range(TASKS)]
    return {"flow_run": str(flow_run.id), "task_runs": [f.result() for f in futures]}


@flow(task_runner=ThreadPoolTaskRunner(max_workers=TASKS))
def limited():
    futures = [api_task.submit(i) for i in range(TASKS)]
    return {"flow_run": str(flow_run.id), "task_runs": [f.result() for f in futures]}


def create_limits():
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=TAG, concurrency_limit=LIMIT)
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=API, limit=LIMIT))
        return [str(client.read_concurrency_limit_by_tag(TAG).id), str(client.read_global_concurrency_limit_by_name(API).id)]


def final_state(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id)).state.type.value


check("limits", create_limits)
check("tagged", tagged)
check("limited", limited)
for name in ("tagged", "limited"):
    if "value" in RESULTS[name]:
        check(name + "_state", lambda: final_state(RESULTS[name]["value"]["flow_run"]))
RESULTS["most"] = {"value": most}
# Sent after every event of the flows on the same worker and socket: once Prefect's server has
# stored it, it has stored them.
emit_event("slotkeeper.gateway-test.marker", resource={"prefect.resource.id": MARKER})
check("drained", lambda: [len(futures) for futures in EventsWorker.drain_all(timeout=30)])
finish()
"""


def related_ids(event: dict[str, Any], role: str) -> list[str]:
    return [r["prefect.resource.id"] for r in event["related"] if r.get("prefect.resource.role") == role]


@pytest.fixture(scope="module")
def flows(run_prefect: RunPrefect, gateway: Server, upstream: PrefectServer) -> Iterator[dict[str, Any]]:
    """The script's results, once Prefect's server has stored every event it sent."""
    marker = f"slotkeeper.gateway-test.{uuid.uuid4()}"
    done = run_prefect(
        FLOWS_SCRIPT,
        {"TAG": TAG, "API": API, "LIMIT": str(LIMIT), "TASKS": str(TASKS), "MARKER": marker},
        timeout=180,
    )
    found = results(done)
    wait_for(lambda: upstream.events({"resource": {"id": [marker]}}), timeout=60, interval=0.25)
    yield found


def test_both_flows_complete_and_no_body_exceeds_the_limit(flows: dict[str, Any]) -> None:
    tag_id, api_id = value(flows, "limits")
    assert tag_id and api_id
    for name in ("tagged", "limited"):
        run = value(flows, name)
        assert len(set(run["task_runs"])) == TASKS, run
        assert value(flows, f"{name}_state") == "COMPLETED"
    most = value(flows, "most")
    # Each body counted itself in: at least one was inside, never more than the limit at once.
    assert 1 <= most["db"] <= LIMIT, most
    assert 1 <= most["api"] <= LIMIT, most
    assert value(flows, "drained") is not None


def _pairs(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each acquired event with the released event that follows it; fails unless every event is
    in exactly one pair."""
    acquired = {e["id"]: e for e in events if e["event"] == ACQUIRED}
    released = [e for e in events if e["event"] == RELEASED]
    assert len(acquired) + len(released) == len(events), [e["event"] for e in events]
    follows = Counter(e["follows"] for e in released)
    assert set(follows) == set(acquired), (follows, list(acquired))
    assert set(follows.values()) == {1}, follows
    return [(acquired[e["follows"]], e) for e in released]


def _limit(flows: dict[str, Any], gateway: Server, limit: str) -> tuple[dict[str, Any], str]:
    """The run of the flow that used ``limit``, and the limit's resource id."""
    run = value(flows, "tagged" if limit.startswith("tag:") else "limited")
    answer = gateway.http.get(f"/v2/concurrency_limits/{limit}")
    assert answer.status_code == 200, answer.text
    return run, f"prefect.concurrency-limit.{answer.json()['id']}"


@pytest.mark.parametrize("limit", [f"tag:{TAG}", API])
def test_slotkeeper_records_one_exact_pair_per_task(
    flows: dict[str, Any], gateway: Server, limit: str
) -> None:
    run, resource = _limit(flows, gateway, limit)
    own = [e.wire() for e in own_slot_events(gateway, resource)]
    assert len(_pairs(own)) == TASKS
    if limit.startswith("tag:"):  # the task engine names the task run as the lease's holder
        holders = Counter(related_ids(e, "task-run")[0] for e in own if e["event"] == ACQUIRED)
        assert holders == Counter(f"prefect.task-run.{t}" for t in run["task_runs"])


def test_run_events_are_read_through_the_gateway_exactly_once(
    flows: dict[str, Any], gateway: Server, upstream: PrefectServer
) -> None:
    for name in ("tagged", "limited"):
        run = value(flows, name)
        flow_run = f"prefect.flow-run.{run['flow_run']}"
        task_runs = [f"prefect.task-run.{t}" for t in run["task_runs"]]
        through = gateway.events({"resource": {"id": [flow_run, *task_runs]}}, limit=10)
        direct = upstream.events({"resource": {"id": [flow_run, *task_runs]}})
        # Through the gateway (ten a page): Prefect's store, as it is, nothing added or lost.
        assert Counter(e["id"] for e in through) == Counter(e["id"] for e in direct)
        assert len({e["id"] for e in through}) == len(through)
        by_resource: dict[str, list[str]] = {}
        for event in through:
            if event["event"] != HEARTBEAT:  # sent every so often while the flow runs
                by_resource.setdefault(event["resource"]["prefect.resource.id"], []).append(event["event"])
        # Each run's state events, once each.
        assert sorted(by_resource[flow_run]) == FLOW_RUN_EVENTS
        for task_run in task_runs:
            assert sorted(by_resource[task_run]) == TASK_RUN_EVENTS, task_run


def test_next_page_links_point_at_the_gateway(flows: dict[str, Any], gateway: Server) -> None:
    run = value(flows, "tagged")
    task_runs = [f"prefect.task-run.{t}" for t in run["task_runs"]]
    answer = gateway.http.post("/events/filter", json={"filter": {"resource": {"id": task_runs}}, "limit": 2})
    assert answer.status_code == 200, answer.text
    next_page = answer.json()["next_page"]
    assert next_page and next_page.startswith(gateway.url + "/"), next_page


@pytest.mark.parametrize("limit", [f"tag:{TAG}", API])
def test_prefect_stores_each_slot_event_once_with_the_run_context(
    flows: dict[str, Any], gateway: Server, upstream: PrefectServer, limit: str
) -> None:
    run, resource = _limit(flows, gateway, limit)
    own = own_slot_events(gateway, resource)
    # Prefect's store: exactly slotkeeper's events (same ids, each once; the client's own copies,
    # with other ids, were dropped at the gateway), with the flow run (and the task run) related.
    outbox_drained(gateway, upstream)
    stored = upstream.events({"event": {"name": [ACQUIRED, RELEASED]}, "resource": {"id": [resource]}})
    assert Counter(e["id"] for e in stored) == Counter(e.id for e in own)
    flow_run = f"prefect.flow-run.{run['flow_run']}"
    task_runs = set()
    for acquired, released in _pairs(stored):
        for event in (acquired, released):
            assert related_ids(event, "flow-run") == [flow_run], event
        if limit.startswith("tag:"):
            assert related_ids(acquired, "task-run") == related_ids(released, "task-run")
            task_runs.update(related_ids(acquired, "task-run"))
    if limit.startswith("tag:"):
        assert task_runs == {f"prefect.task-run.{t}" for t in run["task_runs"]}


def test_counts_and_a_subscription_through_the_gateway_see_each_slot_event_once(
    flows: dict[str, Any], gateway: Server, upstream: PrefectServer
) -> None:
    _, resource = _limit(flows, gateway, f"tag:{TAG}")
    own = own_slot_events(gateway, resource)
    outbox_drained(gateway, upstream)
    # count-by is the upstream's answer, the same through the gateway as directly.
    count = {"filter": {"resource": {"id": [resource]}, "event": {"name": [ACQUIRED, RELEASED]}}}
    through = gateway.http.post("/events/count-by/event", json=count)
    assert through.status_code == 200, through.text
    assert through.json() == upstream.http.post("/events/count-by/event", json=count).json()
    assert {c["value"]: c["count"] for c in through.json()} == {ACQUIRED: TASKS, RELEASED: TASKS}
    # A subscription (/api/events/out, with backfill) through the gateway: each slot event once.
    subscribed = subscribe(gateway, count["filter"], 2 * TASKS)
    assert Counter(e["id"] for e in subscribed) == Counter(e.id for e in own)
