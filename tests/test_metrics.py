"""``GET /metrics`` through the real ASGI app, on both backends (``docs/metrics.md``).

Counters follow what this process committed (grants, releases by how they ended, 423s, waits);
gauges are read from the database at each scrape; per-limit series are capped, the rest summed
under ``limit="_other"``; the endpoint sits behind auth unless opened, and can be turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slotkeeper.api.app import create_app
from slotkeeper.metrics import OTHER, LimitLabels
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock, basic_auth

V2 = "/v2/concurrency_limits"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: httpx.AsyncClient, **headers: str) -> Samples:
    answer = await http.get("http://test/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def requests(samples: Samples, method: str, route: str, status: str) -> float | None:
    """How many requests the latency histogram counted for this route and status."""
    name = "slotkeeper_http_request_duration_seconds_count"
    return value(samples, name, method=method, route=route, status=status)


@contextlib.asynccontextmanager
async def serving(storage: Storage, tmp_path: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the real ASGI app over ``storage``, with these settings."""
    settings = Settings(home=tmp_path, reaper_interval_seconds=0.05, **overrides)
    app = create_app(settings, storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            yield http


@pytest.fixture
async def app_client(storage: Storage, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(storage, tmp_path) as http:
        yield http


async def create(http: httpx.AsyncClient, name: str, limit: int = 1) -> None:
    assert (await http.post(f"{V2}/", json={"name": name, "limit": limit})).status_code == 201


async def acquire(http: httpx.AsyncClient, name: str, **extra: object) -> httpx.Response:
    body = {"names": [name], "slots": 1, "lease_duration": 60, **extra}
    return await http.post(f"{V2}/increment-with-lease", json=body)


async def test_grants_releases_refusals_and_the_gauges(app_client: httpx.AsyncClient) -> None:
    http = app_client
    await create(http, "db", 2)
    first = (await acquire(http, "db")).json()["lease_id"]
    await acquire(http, "db")
    assert (await acquire(http, "db")).status_code == 423
    assert (await http.post(f"{V2}/decrement-with-lease", json={"lease_id": first})).status_code == 204
    await http.post(f"{V2}/increment", json={"names": ["db"], "slots": 1})  # the pool

    samples = await scrape(http)
    assert value(samples, "slotkeeper_limit_grants_total", limit="db") == 3
    assert value(samples, "slotkeeper_limit_releases_total", limit="db", reason="release") == 1
    assert value(samples, "slotkeeper_limit_unavailable_total", limit="db") == 1
    assert value(samples, "slotkeeper_limit_slots", limit="db") == 2
    assert value(samples, "slotkeeper_limit_leased_slots", limit="db") == 1
    assert value(samples, "slotkeeper_limit_pool_slots", limit="db") == 1
    assert value(samples, "slotkeeper_limit_waiters", limit="db") == 0
    assert value(samples, "slotkeeper_limits", state="active") == 1
    route = f"/api{V2}/increment-with-lease"
    assert requests(samples, "POST", route, "200") == 2
    assert requests(samples, "POST", route, "423") == 1
    read = f"/api{V2}/{{id_or_name}}"
    await http.get(f"{V2}/db")
    samples = await scrape(http)
    assert requests(samples, "GET", read, "200") == 1


async def test_waits_and_hand_offs(app_client: httpx.AsyncClient, storage: Storage) -> None:
    http = app_client
    await create(http, "db")
    held = (await acquire(http, "db")).json()["lease_id"]
    waiting = asyncio.ensure_future(acquire(http, "db", wait_seconds=600))
    for _ in range(6000):  # bounded: a broken queue fails instead of hanging
        samples = await scrape(http)
        if value(samples, "slotkeeper_limit_waiters", limit="db") == 1:
            break
        await asyncio.sleep(0.005)
    assert value(samples, "slotkeeper_waiting_requests") == 1
    await http.post(f"{V2}/decrement-with-lease", json={"lease_id": held})
    assert (await asyncio.wait_for(waiting, 30)).status_code == 200
    samples = await scrape(http)
    assert value(samples, "slotkeeper_limit_wait_seconds_count", limit="db") == 1
    assert value(samples, "slotkeeper_limit_handoff_seconds_count", limit="db") == 1
    assert value(samples, "slotkeeper_waiting_requests") == 0


async def test_expiry_deletion_and_their_series(
    app_client: httpx.AsyncClient, storage: Storage, clock: FakeClock
) -> None:
    http = app_client
    await create(http, "db")
    await create(http, "gone")
    await acquire(http, "db")
    await acquire(http, "gone")
    clock.advance(61)  # the lease on "db" expired (the one on "gone" too)
    for _ in range(6000):  # both leases: the reaper ends them in two transactions, maybe at once
        samples = await scrape(http)
        if (
            value(samples, "slotkeeper_limit_releases_total", limit="db", reason="expiry") == 1
            and value(samples, "slotkeeper_reaper_lateness_seconds_count") == 2
        ):
            break
        await asyncio.sleep(0.005)
    assert value(samples, "slotkeeper_reaper_lateness_seconds_count") == 2
    await acquire(http, "gone")
    assert (await http.delete(f"{V2}/gone")).status_code == 204
    samples = await scrape(http)  # the scrape after a deletion shows what it released ...
    assert value(samples, "slotkeeper_limit_releases_total", limit="gone", reason="deletion") == 1
    samples = await scrape(http)  # ... and the next has no series of it
    assert not [key for key in samples if ("limit", "gone") in key[1]]
    assert value(samples, "slotkeeper_limits", state="active") == 1


async def test_series_per_limit_are_capped_and_the_rest_summed(storage: Storage, tmp_path: Path) -> None:
    async with serving(storage, tmp_path, metrics_max_limits=2) as http:
        await _capped(http)


async def _capped(http: httpx.AsyncClient) -> None:
    for name in ("a", "b", "c"):
        await create(http, name, 5)
    for name, count in (("a", 1), ("b", 3), ("c", 2)):
        for _ in range(count):
            await acquire(http, name)
    samples = await scrape(http)
    # Counters: the first two limits that saw a grant, the third under _other.
    assert value(samples, "slotkeeper_limit_grants_total", limit="a") == 1
    assert value(samples, "slotkeeper_limit_grants_total", limit="b") == 3
    assert value(samples, "slotkeeper_limit_grants_total", limit=OTHER) == 2
    # Gauges: the two busiest now (b: 3, c: 2), the others summed.
    assert value(samples, "slotkeeper_limit_leased_slots", limit="b") == 3
    assert value(samples, "slotkeeper_limit_leased_slots", limit="c") == 2
    assert value(samples, "slotkeeper_limit_leased_slots", limit=OTHER) == 1
    assert value(samples, "slotkeeper_limit_slots", limit=OTHER) == 5
    assert value(samples, "slotkeeper_limit_leased_slots", limit="a") is None


def test_labels_are_given_once_renamed_and_freed() -> None:
    forgotten: list[str] = []
    labels = LimitLabels(1, forgotten.append)
    assert labels.of("id-1", "a") == "a"
    assert labels.of("id-2", "b") == OTHER  # no room
    assert labels.named("a") == "a" and labels.named("b") == OTHER
    assert labels.of("id-1", "renamed") == "renamed"
    assert forgotten == ["a"]
    labels.deleted("id-1")
    assert labels.of("id-2", "b") == OTHER  # its room is freed at the next scrape
    labels.sweep()
    assert forgotten == ["a", "renamed"]
    assert labels.of("id-2", "b") == "b"


async def test_behind_auth_unless_opened_and_off_when_turned_off(storage: Storage, tmp_path: Path) -> None:
    async with serving(storage, tmp_path, api_auth_string="admin:pw") as http:
        assert (await http.get("http://test/metrics")).status_code == 401
        await scrape(http, Authorization=basic_auth("admin:pw"))
    async with serving(storage, tmp_path, api_auth_string="admin:pw", metrics_open=True) as http:
        await scrape(http)
        assert (await http.get("/v2/concurrency_limits/x")).status_code == 401
    async with serving(storage, tmp_path, metrics_enabled=False) as http:
        assert (await http.get("http://test/metrics")).status_code == 404


async def test_the_postgres_pool_is_reported(app_client: httpx.AsyncClient, storage: Storage) -> None:
    samples = await scrape(app_client)
    if storage.backend.name == "sqlite":
        assert value(samples, "slotkeeper_sqlite_group_operations_count")
        assert value(samples, "slotkeeper_postgres_pool_size") is None
    else:
        assert value(samples, "slotkeeper_postgres_pool_size") == 8
        busy = value(samples, "slotkeeper_postgres_pool_connections", state="busy")
        idle = value(samples, "slotkeeper_postgres_pool_connections", state="idle")
        assert busy is not None and idle is not None and busy + idle >= 1
        assert value(samples, "slotkeeper_postgres_pool_waiting_operations") == 0


async def test_every_way_a_grant_ends_is_told_to_this_processs_observers(
    storage: Storage, clock: FakeClock
) -> None:
    from slotkeeper.events import builders
    from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
    from slotkeeper.storage.tags import TagStore
    from slotkeeper.storage.tx import Commit

    seen: list[tuple[str, str | None]] = []

    def observe(commit: Commit) -> None:
        seen.extend((e.resource.get("prefect.resource.name", ""), e.cause) for e in commit.events if e.cause)

    stop = storage.backend.observe(observe)
    try:
        for name in ("released", "expired", "ended", "deleted"):
            await storage.create_limit(LimitSpec(name, 1))
        lease = {}
        for name in ("released", "expired", "ended", "deleted"):
            granted = await storage.acquire(AcquireRequest([name], 1, lease=LeaseSpec(60)))
            lease[name] = granted.lease_id
        await storage.release_lease(lease["released"])
        await storage.release_lease(lease["ended"], cause=builders.OPERATOR)
        await storage.delete_limit("deleted")
        clock.advance(61)
        await storage.reap_expired()
        tags = TagStore(storage)
        await tags.upsert("t", 1)
        await tags.acquire(["t"], "5f8a3c1e-2b4d-4e6f-8a9b-0c1d2e3f4a5b")
        await tags.reset("t")
    finally:
        stop()
    assert sorted(seen) == [
        ("deleted", builders.DELETION),
        ("ended", builders.OPERATOR),
        ("expired", builders.EXPIRY),
        ("released", builders.RELEASE),
        ("t", builders.RESET),
    ]
