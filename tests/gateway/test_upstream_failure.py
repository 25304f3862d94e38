"""Prefect's server killed while a Prefect process holds a slot through the gateway.

The gateway (on PostgreSQL here, so that both backends run end to end) keeps serving concurrency
without its upstream: the process gives its slot back and takes more with Prefect's
``concurrency()``, a Prefect process started during the outage does too, plain lease calls work,
and forwarded calls fail at once with 502 and a body that says why. Once Prefect's server is back
(same port, same database), every slot event of the outage reaches its store, each exactly once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.compat.conftest import RunPrefect, StartPrefect, results, value, wait_for
from tests.gateway.conftest import (
    ACQUIRED,
    RELEASED,
    PrefectServer,
    outbox_backlog,
    outbox_drained,
    own_slot_events,
    running_gateway,
    take_and_give_back,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: Holds a slot until told to go on (the test kills the upstream meanwhile), gives it back, takes
#: BLOCKS more, then waits to be told the upstream is back before it exits.
OUTAGE_SCRIPT = """
from prefect.concurrency.sync import concurrency

LIMIT, BLOCKS = os.environ["LIMIT"], int(os.environ["BLOCKS"])


def blocks():
    done = 0
    for _ in range(BLOCKS):
        with concurrency(LIMIT, occupy=1, timeout_seconds=30):
            done += 1
    return done


with concurrency(LIMIT, occupy=1, timeout_seconds=30):
    say(step="inside")
    sys.stdin.readline()
check("blocks", blocks)
say(step="down")
sys.stdin.readline()
finish()
"""

#: A Prefect process that starts while the upstream is down: one ``concurrency()`` block.
FRESH_SCRIPT = """
from prefect.concurrency.sync import concurrency


def block():
    with concurrency(os.environ["LIMIT"], occupy=1, timeout_seconds=30):
        return slots(os.environ["LIMIT"])


check("block", block)
finish()
"""

BLOCKS = 5


def test_concurrency_outlives_the_upstream_and_its_events_reach_it_once_it_is_back(
    upstream: PrefectServer,
    start_prefect: StartPrefect,
    run_prefect: RunPrefect,
    private_postgres_url: str,
    tmp_path: Path,
) -> None:
    name = f"outage-{uuid.uuid4().hex[:8]}"
    # Deliveries back off up to 30 s by default while the upstream is down: 1 s here.
    settings = {"SLOTKEEPER_DATABASE_URL": private_postgres_url, "SLOTKEEPER_OUTBOX_MAX_BACKOFF_SECONDS": "1"}
    with running_gateway(tmp_path / "gateway", upstream, settings) as gateway:
        created = gateway.http.post("/v2/concurrency_limits/", json={"name": name, "limit": 1})
        assert created.status_code == 201, created.text
        resource = f"prefect.concurrency-limit.{created.json()['id']}"
        script = start_prefect(OUTAGE_SCRIPT, {"LIMIT": name, "BLOCKS": str(BLOCKS)}, server=gateway)
        script.expect("inside", timeout=120)
        # The first acquired event is in Prefect's store before the crash: what Prefect's server
        # had only received, not yet stored, dies with it (no delivery can know).
        (first,) = own_slot_events(gateway, resource)
        wait_for(lambda: upstream.events({"id": {"id": [first.id]}}), timeout=60, interval=0.25)

        upstream.kill()
        try:
            script.send()  # releases with the upstream down, then takes BLOCKS more
            script.expect("down", timeout=120)

            take_and_give_back(gateway, name)  # plain lease calls too

            log_before = len(gateway.log_text())
            forwarded = gateway.http.post("/flows/filter", json={})
            assert forwarded.status_code == 502, forwarded.text
            body = forwarded.json()
            assert body["code"] == "upstream_unavailable"
            assert body["detail"]
            assert "upstream" in gateway.log_text()[log_before:].lower()

            fresh = results(run_prefect(FRESH_SCRIPT, {"LIMIT": name}, server=gateway, timeout=120))
            assert value(fresh, "block") == 1
            # Every slot event since the crash waits in the outbox (none was sent and dropped).
            assert outbox_backlog(gateway) >= 2 * (BLOCKS + 2) + 1
        finally:
            upstream.start()  # same port, same database
        script.send()
        assert value(results(script.finish(timeout=120)), "blocks") == BLOCKS

        own = own_slot_events(gateway, resource)
        pairs = 1 + BLOCKS + 1 + 1  # held across the crash, the blocks, plain HTTP, the fresh process
        assert Counter(e.event for e in own) == {ACQUIRED: pairs, RELEASED: pairs}
        outbox_drained(gateway, upstream)
        stored = upstream.events({"event": {"name": [ACQUIRED, RELEASED]}, "resource": {"id": [resource]}})
        assert Counter(e["id"] for e in stored) == Counter(e.id for e in own)
