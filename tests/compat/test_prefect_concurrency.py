"""Prefect's ``concurrency()`` and ``rate_limit()`` (sync and asyncio) against slotkeeper.

The limits are made, and a slot of ``full`` is held, with plain HTTP from the test; one script
then runs every sync and async case and records what it saw, and the tests assert on it. The
lease test follows a second script while it sits inside ``concurrency()``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import (
    RunPrefect,
    Server,
    StartPrefect,
    results,
    running_server,
    value,
    wait_for,
)

pytestmark = pytest.mark.slow

ACQUIRED = "prefect.concurrency-limit.acquired"
RELEASED = "prefect.concurrency-limit.released"

LIMITS: dict[str, dict[str, Any]] = {
    "one": {"limit": 2},
    "pair-a": {"limit": 3},
    "pair-b": {"limit": 3},
    "full": {"limit": 1},
    "small": {"limit": 2},
    "off": {"limit": 1, "active": False},
    "rl-sync": {"limit": 2, "slot_decay_per_second": 2.0},
    "rl-async": {"limit": 2, "slot_decay_per_second": 2.0},
    "no-decay": {"limit": 5},
    "rl-slow": {"limit": 1, "slot_decay_per_second": 0.01},
    "leased": {"limit": 3},
}

SCRIPT = """
from prefect.concurrency.asyncio import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
    concurrency as aconcurrency,
    rate_limit as arate_limit,
)
from prefect.concurrency.sync import concurrency, rate_limit


def leases(name):
    status, body = http("GET", f"/v2/concurrency_limits/{name}/leases")
    assert status == 200, (status, body)
    return body


def outcome(fn):
    \"\"\"What fn() did: its value or exception, and how long it took.\"\"\"
    start = time.monotonic()
    try:
        result = {"value": fn()}
    except Exception as exc:
        result = {
            "error": type(exc).__name__,
            "message": str(exc),
            "acquisition_error": isinstance(exc, ConcurrencySlotAcquisitionError),
            "timeout_error": isinstance(exc, TimeoutError),
        }
    result["elapsed"] = time.monotonic() - start
    return result


async def aoutcome(fn):
    start = time.monotonic()
    try:
        result = {"value": await fn()}
    except Exception as exc:
        result = {
            "error": type(exc).__name__,
            "message": str(exc),
            "acquisition_error": isinstance(exc, ConcurrencySlotAcquisitionError),
            "timeout_error": isinstance(exc, TimeoutError),
        }
    result["elapsed"] = time.monotonic() - start
    return result


# --- sync ---

def sync_hold(names, occupy):
    listed = [names] if isinstance(names, str) else sorted(names)
    with concurrency(names, occupy=occupy):
        inside = {name: slots(name) for name in listed}
        inside_leases = {name: len(leases(name)) for name in listed}
    return {
        "inside": inside,
        "inside_leases": inside_leases,
        "after": {name: slots(name) for name in listed},
        "after_leases": {name: len(leases(name)) for name in listed},
    }


def sync_body_raises():
    try:
        with concurrency("one"):
            inside = slots("one")
            raise RuntimeError("boom")
    except RuntimeError as exc:
        return {"inside": inside, "after": slots("one"), "raised": str(exc)}


def sync_enter(**kwargs):
    with concurrency(**kwargs):
        return "body ran"


def sync_rate():
    rate_limit("rl-sync", occupy=2)
    first = slots("rl-sync")
    start = time.monotonic()
    rate_limit("rl-sync", occupy=2)  # must wait for the first two slots to decay
    waited = time.monotonic() - start
    time.sleep(1.2)
    return {"after_first": first, "second_waited": waited, "decayed": slots("rl-sync")}


check("sync_one", lambda: sync_hold("one", 2))
check("sync_two", lambda: sync_hold(["pair-b", "pair-a"], 1))
check("sync_body_raises", sync_body_raises)
check("sync_inactive", lambda: sync_hold("off", 1))
check("sync_missing_lenient", lambda: outcome(lambda: sync_enter(names="missing")))
check("sync_missing_strict", lambda: outcome(lambda: sync_enter(names="missing", strict=True)))
check("sync_timeout", lambda: outcome(lambda: sync_enter(names="full", timeout_seconds=1)))
check("sync_max_retries", lambda: outcome(lambda: sync_enter(names="full", max_retries=0)))
check("sync_over_limit", lambda: outcome(lambda: sync_enter(names="small", occupy=3)))
check("sync_short_lease", lambda: outcome(lambda: sync_enter(names="one", lease_duration=30)))
check("sync_rate", sync_rate)
check("sync_rate_no_decay", lambda: outcome(lambda: rate_limit("no-decay")))
check("sync_rate_missing_strict", lambda: outcome(lambda: rate_limit("missing", strict=True)))
check("sync_rate_missing_lenient", lambda: outcome(lambda: rate_limit("missing")))
check("sync_rate_fill", lambda: outcome(lambda: rate_limit("rl-slow")))
check("sync_rate_timeout", lambda: outcome(lambda: rate_limit("rl-slow", timeout_seconds=1)))


# --- asyncio ---

async def async_hold(names, occupy):
    listed = [names] if isinstance(names, str) else sorted(names)
    async with aconcurrency(names, occupy=occupy):
        inside = {name: slots(name) for name in listed}
    return {"inside": inside, "after": {name: slots(name) for name in listed}}


async def async_enter(**kwargs):
    async with aconcurrency(**kwargs):
        return "body ran"


async def async_contended():
    \"\"\"Two tasks want both slots of 'one': the second waits (423, Retry-After) for the first.\"\"\"
    order = []

    async def worker(tag, hold):
        async with aconcurrency("one", occupy=2, timeout_seconds=30):
            order.append((tag, "in", slots("one")))
            await asyncio.sleep(hold)
            order.append((tag, "out"))

    first = asyncio.create_task(worker("first", 1.0))
    await asyncio.sleep(0.3)
    await worker("second", 0)
    await first
    return {"order": order, "after": slots("one")}


async def async_rate():
    await arate_limit("rl-async", occupy=2)
    first = slots("rl-async")
    start = time.monotonic()
    await arate_limit("rl-async", occupy=2)
    waited = time.monotonic() - start
    await asyncio.sleep(1.2)
    return {"after_first": first, "second_waited": waited, "decayed": slots("rl-async")}


async def async_main():
    await acheck("async_one", lambda: async_hold("one", 2))
    await acheck("async_two", lambda: async_hold(["pair-a", "pair-b"], 3))
    await acheck("async_missing_lenient", lambda: aoutcome(lambda: async_enter(names="missing")))
    await acheck("async_missing_strict", lambda: aoutcome(lambda: async_enter(names=["missing"], strict=True)))
    await acheck("async_timeout", lambda: aoutcome(lambda: async_enter(names="full", timeout_seconds=1)))
    await acheck("async_max_retries", lambda: aoutcome(lambda: async_enter(names="full", max_retries=0)))
    await acheck("async_over_limit", lambda: aoutcome(lambda: async_enter(names="small", occupy=3)))
    await acheck("async_contended", async_contended)
    await acheck("async_rate", async_rate)
    await acheck("async_rate_no_decay", lambda: aoutcome(lambda: arate_limit(["no-decay"])))
    await acheck("async_rate_missing_strict", lambda: aoutcome(lambda: arate_limit("missing", strict=True)))
    await acheck("async_rate_timeout", lambda: aoutcome(lambda: arate_limit("rl-slow", timeout_seconds=1)))


asyncio.run(async_main())
check("full_still_held_once", lambda: {"slots": slots("full"), "leases": len(leases("full"))})
finish()
"""


@pytest.fixture(scope="module")
def limits(server: Server) -> Server:
    """The server with :data:`LIMITS` made, and the only slot of ``full`` held by the test."""
    for name, fields in LIMITS.items():
        answer = server.http.post("/v2/concurrency_limits/", json={"name": name, **fields})
        assert answer.status_code == 201, answer.text
    held = server.http.post(
        "/v2/concurrency_limits/increment-with-lease",
        json={"names": ["full"], "slots": 1, "lease_duration": 600},
    )
    assert held.status_code == 200, held.text
    return server


@pytest.fixture(scope="module")
def found(limits: Server, run_prefect: RunPrefect) -> dict[str, dict[str, Any]]:
    return results(run_prefect(SCRIPT))


# --- concurrency(): slots held inside, free after -------------------------------------------------


def test_sync_concurrency_one_limit(found: dict[str, dict[str, Any]]) -> None:
    seen = value(found, "sync_one")
    assert seen == {
        "inside": {"one": 2},
        "inside_leases": {"one": 1},
        "after": {"one": 0},
        "after_leases": {"one": 0},
    }


def test_sync_concurrency_two_limits(found: dict[str, dict[str, Any]]) -> None:
    seen = value(found, "sync_two")
    assert seen["inside"] == {"pair-a": 1, "pair-b": 1}
    assert seen["inside_leases"] == {"pair-a": 1, "pair-b": 1}
    assert seen["after"] == {"pair-a": 0, "pair-b": 0}
    assert seen["after_leases"] == {"pair-a": 0, "pair-b": 0}


def test_sync_concurrency_releases_when_the_body_raises(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "sync_body_raises") == {"inside": 1, "after": 0, "raised": "boom"}


def test_inactive_limit_is_not_counted(found: dict[str, dict[str, Any]]) -> None:
    seen = value(found, "sync_inactive")
    assert seen["inside"] == {"off": 0}
    assert seen["after"] == {"off": 0}


def test_async_concurrency_one_and_two_limits(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "async_one") == {"inside": {"one": 2}, "after": {"one": 0}}
    assert value(found, "async_two") == {
        "inside": {"pair-a": 3, "pair-b": 3},
        "after": {"pair-a": 0, "pair-b": 0},
    }


def test_async_concurrency_waits_for_a_held_limit(found: dict[str, dict[str, Any]]) -> None:
    seen = value(found, "async_contended")
    order = [tuple(step) for step in seen["order"]]
    assert order == [("first", "in", 2), ("first", "out"), ("second", "in", 2), ("second", "out")]
    assert seen["after"] == 0


# --- concurrency(): refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_missing_limit(found: dict[str, dict[str, Any]], mode: str) -> None:
    lenient = value(found, f"{mode}_missing_lenient")
    assert lenient["value"] == "body ran"
    strict = value(found, f"{mode}_missing_strict")
    assert strict["error"] == "ConcurrencySlotAcquisitionError"
    assert strict["message"] == "Concurrency limits ['missing'] must be created before acquiring slots"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_timeout_on_a_full_limit(found: dict[str, dict[str, Any]], mode: str) -> None:
    seen = value(found, f"{mode}_timeout")
    assert seen["error"] == "AcquireConcurrencySlotTimeoutError"
    assert seen["timeout_error"] is True
    assert seen["message"] == "Attempt to acquire concurrency slots timed out after 1 second(s)"
    assert 0.9 <= seen["elapsed"] < 10


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_retries_on_a_full_limit(found: dict[str, dict[str, Any]], mode: str) -> None:
    seen = value(found, f"{mode}_max_retries")
    assert seen["error"] == "ConcurrencySlotAcquisitionError"
    assert seen["message"] == "Unable to acquire concurrency slots on ['full']: 423 Locked: Locked"
    assert seen["elapsed"] < 10


def test_refusals_leave_the_held_slot_alone(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "full_still_held_once") == {"slots": 1, "leases": 1}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_occupy_over_the_limit(found: dict[str, dict[str, Any]], mode: str) -> None:
    seen = value(found, f"{mode}_over_limit")
    assert seen["error"] == "ConcurrencySlotAcquisitionError"
    assert seen["message"] == (
        "Unable to acquire concurrency slots on ['small']: "
        "422 Unprocessable Entity: Slots requested is greater than the limit"
    )


def test_lease_shorter_than_the_server_minimum(found: dict[str, dict[str, Any]]) -> None:
    seen = value(found, "sync_short_lease")
    assert seen["error"] == "ConcurrencySlotAcquisitionError"
    assert seen["message"] == (
        "Unable to acquire concurrency slots on ['one']: "
        "422 Unprocessable Entity: lease_duration: Input should be greater than or equal to 60"
    )


# --- rate_limit() ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rate_limit_takes_slots_that_decay(found: dict[str, dict[str, Any]], mode: str) -> None:
    seen = value(found, f"{mode}_rate")
    assert seen["after_first"] in (1, 2)  # 2 taken, decaying at 2 per second
    # The limit is full after the first call: the second waits for about a second of decay.
    assert 0.4 <= seen["second_waited"] < 10
    assert seen["decayed"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rate_limit_without_decay_raises(found: dict[str, dict[str, Any]], mode: str) -> None:
    seen = value(found, f"{mode}_rate_no_decay")
    assert seen["error"] == "ConcurrencySlotAcquisitionError"
    assert seen["message"] == (
        "Unable to acquire concurrency slots on ['no-decay']: 422 Unprocessable Entity: "
        "Only concurrency limits with slot decay can be used for rate limiting. "
        "The following limits do not have a decay configured: 'no-decay'"
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rate_limit_timeout(found: dict[str, dict[str, Any]], mode: str) -> None:
    assert value(found, "sync_rate_fill")["value"] is None  # rl-slow is now full for 100 s
    seen = value(found, f"{mode}_rate_timeout")
    assert seen["error"] == "AcquireConcurrencySlotTimeoutError"
    assert seen["timeout_error"] is True
    assert 0.9 <= seen["elapsed"] < 10


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rate_limit_on_a_missing_limit(found: dict[str, dict[str, Any]], mode: str) -> None:
    strict = value(found, f"{mode}_rate_missing_strict")
    assert strict["error"] == "ConcurrencySlotAcquisitionError"
    assert strict["message"] == "Concurrency limits ['missing'] must be created before acquiring slots"
    if mode == "sync":
        assert value(found, "sync_rate_missing_lenient")["value"] is None


# --- leases: holder and renewal, seen from outside while the script holds them ---------------------

LEASE_SCRIPT = """
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import concurrency as aconcurrency
from prefect.concurrency.sync import concurrency

task_run = uuid.uuid4()
with concurrency("leased", occupy=2, lease_duration=60,
                 holder=ConcurrencyLeaseHolder(type="task_run", id=task_run)):
    say(step="inside-sync", holder=str(task_run))
    sys.stdin.readline()
say(step="after-sync", slots=slots("leased"))


async def main():
    flow_run = uuid.uuid4()
    async with aconcurrency("leased", lease_duration=90,
                            holder=ConcurrencyLeaseHolder(type="flow_run", id=flow_run)):
        say(step="inside-async", holder=str(flow_run))
        await asyncio.to_thread(sys.stdin.readline)
    say(step="after-async", slots=slots("leased"))

asyncio.run(main())
"""


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _renewed_lease(server: Server, duration: float) -> dict[str, Any] | None:
    """The one lease on ``leased`` once Prefect's renewal thread has extended it, else None.

    A lease as granted expires exactly ``duration`` after it was created; renewal moves the
    expiry to ``duration`` after the renewal, so later than that.
    """
    answer = server.http.get("/v2/concurrency_limits/leased/leases")
    assert answer.status_code == 200, answer.text
    leases = answer.json()
    assert len(leases) == 1, leases
    lease: dict[str, Any] = leases[0]
    span = (_time(lease["expires"]) - _time(lease["created"])).total_seconds()
    return lease if span > duration else None


def test_lease_holder_and_renewal(limits: Server, start_prefect: StartPrefect) -> None:
    server = limits
    script = start_prefect(LEASE_SCRIPT)

    inside = script.expect("inside-sync")
    sync_holder = inside["holder"]
    lease = wait_for(lambda: _renewed_lease(server, 60))
    assert lease["holder"] == {"type": "task_run", "id": sync_holder}
    assert lease["slots"] == 2
    assert uuid.UUID(lease["lease_id"])
    remaining = (_time(lease["expires"]) - datetime.now(UTC)).total_seconds()
    assert 45 < remaining <= 61
    assert server.http.get("/v2/concurrency_limits/leased").json()["active_slots"] == 2
    script.send()
    assert script.expect("after-sync")["slots"] == 0

    inside = script.expect("inside-async")
    lease = wait_for(lambda: _renewed_lease(server, 90))
    assert lease["holder"] == {"type": "flow_run", "id": inside["holder"]}
    assert lease["slots"] == 1
    script.send()
    assert script.expect("after-async")["slots"] == 0
    script.finish()
    assert server.http.get("/v2/concurrency_limits/leased/leases").json() == []

    # The server's slot events name the holder as a related resource.
    limit_id = server.http.get("/v2/concurrency_limits/leased").json()["id"]
    events = server.events(
        {
            "event": {"name": [ACQUIRED, RELEASED]},
            "resource": {"id": [f"prefect.concurrency-limit.{limit_id}"]},
        }
    )
    assert [e["event"] for e in events] == [ACQUIRED, RELEASED, ACQUIRED, RELEASED]
    holders = [
        {"prefect.resource.id": f"prefect.task-run.{sync_holder}", "prefect.resource.role": "task-run"},
        {"prefect.resource.id": f"prefect.flow-run.{inside['holder']}", "prefect.resource.role": "flow-run"},
    ]
    assert [e["related"] for e in events] == [[holders[0]], [holders[0]], [holders[1]], [holders[1]]]


# --- lease renewal on the wire, on a server that allows short leases -------------------------------

RENEWAL_SCRIPT = """
from prefect.concurrency.asyncio import concurrency as aconcurrency
from prefect.concurrency.sync import concurrency


def leases():
    status, body = http("GET", "/v2/concurrency_limits/short/leases")
    assert status == 200, (status, body)
    return body


def kept():
    # A 2 s lease, renewed by Prefect's thread every 1.5 s, outlives its duration.
    samples = []
    with concurrency("short", lease_duration=2):
        for _ in range(9):
            time.sleep(0.5)
            samples.append({"slots": slots("short"), "expires": [lease["expires"] for lease in leases()]})
    return {"samples": samples, "after": slots("short")}


async def revoked():
    # Someone else releases the lease: the next renewal gets 410 and strict cancels the body.
    start = time.monotonic()
    try:
        async with aconcurrency("short", lease_duration=2, strict=True):
            (lease,) = leases()
            status, _ = http("POST", "/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease["lease_id"]})
            await asyncio.sleep(20)
            return {"cancelled": False}
    except asyncio.CancelledError as exc:
        return {"cancelled": True, "error": type(exc).__name__, "revoke_status": status,
                "elapsed": time.monotonic() - start, "slots": slots("short")}


check("kept", kept)
asyncio.run(acheck("revoked", revoked))
finish()
"""


@pytest.fixture(scope="module")
def short_lease_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("slotkeeper-short-leases")
    with running_server(home, settings={"SLOTKEEPER_LEASE_MIN_SECONDS": "1"}) as running:
        answer = running.http.post("/v2/concurrency_limits/", json={"name": "short", "limit": 2})
        assert answer.status_code == 201, answer.text
        yield running


def test_renewal_keeps_a_short_lease_and_a_revoked_one_cancels_strict(
    short_lease_server: Server, run_prefect: RunPrefect
) -> None:
    server = short_lease_server
    found = results(run_prefect(RENEWAL_SCRIPT, server=server))

    kept = value(found, "kept")
    assert all(sample["slots"] == 1 for sample in kept["samples"]), kept
    expiries = [sample["expires"] for sample in kept["samples"]]
    assert all(len(e) == 1 for e in expiries), expiries
    # 4.5 s inside a 2 s lease: renewed at least twice, so at least three distinct expiries.
    assert len({e[0] for e in expiries}) >= 3, expiries
    assert kept["after"] == 0

    revoked = value(found, "revoked")
    assert revoked["cancelled"] is True, revoked
    assert revoked["revoke_status"] == 204
    assert revoked["slots"] == 0
    assert revoked["elapsed"] < 15

    # The server wrote one acquired and one released per grant, whoever ended it.
    events = server.events({"event": {"name": [ACQUIRED, RELEASED]}})
    assert [e["event"] for e in events] == [ACQUIRED, RELEASED, ACQUIRED, RELEASED]
    assert events[1]["follows"] == events[0]["id"]
    assert events[3]["follows"] == events[2]["id"]


# --- a lease held by Prefect's client survives a server restart ------------------------------------

RESTART_SCRIPT = """
from prefect.concurrency.sync import concurrency
from prefect.events.worker import EventsWorker

with concurrency("durable", occupy=2, lease_duration=60):
    say(step="inside", slots=slots("durable"))
    sys.stdin.readline()  # the test restarts the server here
    still = slots("durable")
say(step="after", inside=still, after=slots("durable"))

with concurrency("durable"):  # the same client carries on with the new process
    again = slots("durable")
say(step="again", inside=again, after=slots("durable"))
EventsWorker.drain_all(timeout=30)
"""


def test_a_lease_survives_a_server_restart(tmp_path: Path, start_prefect: StartPrefect) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with running_server(home) as server:
        answer = server.http.post("/v2/concurrency_limits/", json={"name": "durable", "limit": 2})
        assert answer.status_code == 201, answer.text
        script = start_prefect(RESTART_SCRIPT, server=server)
        assert script.expect("inside")["slots"] == 2
        before = server.http.get("/v2/concurrency_limits/durable/leases").json()
        assert len(before) == 1

        server.restart()
        (lease,) = server.http.get("/v2/concurrency_limits/durable/leases").json()
        # The same lease (its expiry may have moved: Prefect renews it as soon as it is granted).
        same = ("lease_id", "slots", "created", "fencing_token")
        assert {k: lease[k] for k in same} == {k: before[0][k] for k in same}
        assert lease["expires"] >= before[0]["expires"]
        script.send()
        after = script.expect("after")
        assert (after["inside"], after["after"]) == (2, 0)
        again = script.expect("again")
        assert (again["inside"], again["after"]) == (1, 0)
        script.finish()

        events = server.events({"event": {"name": [ACQUIRED, RELEASED]}})
        assert [e["event"] for e in events] == [ACQUIRED, RELEASED, ACQUIRED, RELEASED]
        assert events[1]["follows"] == events[0]["id"]
        assert events[3]["follows"] == events[2]["id"]
