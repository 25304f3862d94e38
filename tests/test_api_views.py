"""The operator endpoints through the real ASGI app, on SQLite and PostgreSQL: the overview, a
limit's queue and statistics, an operator ending a lease (``DELETE .../leases/{id}``), their
refusals; and the dashboard's pages behind the API's auth.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock, basic_auth

V2 = "/v2/concurrency_limits"
LEASE_GONE = {"detail": "Lease not found - it may have expired or been revoked", "code": "lease_gone"}
NOT_FOUND = {"detail": "Concurrency Limit not found", "code": "limit_not_found"}


async def create(client: httpx.AsyncClient, name: str, limit: int = 1, **fields: Any) -> dict[str, Any]:
    r = await client.post(f"{V2}/", json={"name": name, "limit": limit, **fields})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def lease(client: httpx.AsyncClient, *names: str, slots: int = 1, **fields: Any) -> str:
    r = await client.post(
        f"{V2}/increment-with-lease",
        json={"names": list(names), "slots": slots, "lease_duration": 60, **fields},
    )
    assert r.status_code == 200, r.text
    lease_id: str = r.json()["lease_id"]
    return lease_id


async def queued(client: httpx.AsyncClient, name: str, count: int) -> list[dict[str, Any]]:
    """The queue of ``name`` once it holds ``count`` requests (bounded, never timed)."""
    for _ in range(6000):
        r = await client.get(f"{V2}/{name}/queue")
        assert r.status_code == 200, r.text
        if len(r.json()) == count:
            body: list[dict[str, Any]] = r.json()
            return body
        await asyncio.sleep(0.005)
    pytest.fail(f"the queue of {name} never held {count} requests")


async def test_the_overview_answers_a_page_with_slots_and_waiters(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await create(client, "db", 2)
    await create(client, "rl", 10, slot_decay_per_second=2.0)
    await lease(client, "db", slots=2)
    r = await client.post(f"{V2}/increment", json={"names": ["rl"], "slots": 5, "mode": "rate_limit"})
    assert r.status_code == 200
    waiting = asyncio.ensure_future(
        client.post(f"{V2}/increment-with-lease", json={"names": ["db"], "slots": 1, "wait_seconds": 60})
    )
    await queued(client, "db", 1)
    clock.advance(1.25)

    r = await client.post(f"{V2}/overview", json={})
    assert r.status_code == 200
    page = r.json()
    assert (page["now"], page["total"], page["offset"]) == (clock.now, 2, 0)
    db, rl = page["limits"]
    assert {k: db[k] for k in ("name", "limit", "active_slots", "leased_slots", "pool_slots", "waiters")} == {
        "name": "db",
        "limit": 2,
        "active_slots": 2,
        "leased_slots": 2,
        "pool_slots": 0,
        "waiters": 1,
    }
    assert (db["rate_limit"], db["waiting_slots"]) == (False, 1)
    # The pool as decayed at ``now``, and from when the next slot leaves it: 2/s for 1.25 s.
    assert (rl["rate_limit"], rl["pool_slots"], rl["active_slots"]) == (True, 3, 3)
    assert rl["pool_clock"] == pytest.approx(page["now"] - 0.25)
    # Paged and filtered; no body is the first page.
    r = await client.post(f"{V2}/overview", json={"limit": 1, "offset": 1, "prefix": "r"})
    assert ([lim["name"] for lim in r.json()["limits"]], r.json()["total"]) == ([], 1)
    r = await client.post(f"{V2}/overview")
    assert [lim["name"] for lim in r.json()["limits"]] == ["db", "rl"]
    waiting.cancel()


@pytest.mark.parametrize(
    ("body", "status"),
    [({"limit": 201}, 422), ({"offset": -1}, 422), ({"prefix": 3}, 422), ({"sort": "name"}, 422)],
)
async def test_the_overview_refuses_a_bad_page(client: httpx.AsyncClient, body: Any, status: int) -> None:
    r = await client.post(f"{V2}/overview", json=body)
    assert r.status_code == status, r.text


async def test_the_queue_lists_waiters_in_order(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await create(client, "db")
    await lease(client, "db")
    holder = {"type": "flow_run", "id": str(uuid.uuid4())}
    first = asyncio.ensure_future(
        client.post(f"{V2}/increment-with-lease", json={"names": ["db"], "slots": 1, "wait_seconds": 60})
    )
    await queued(client, "db", 1)
    clock.advance(1)
    urgent = asyncio.ensure_future(
        client.post(
            f"{V2}/increment-with-lease",
            json={"names": ["db"], "slots": 1, "wait_seconds": 60, "priority": 3, "holder": holder},
        )
    )
    queue = await queued(client, "db", 2)
    assert [(w["position"], w["priority"], w["slots"], w["holder"], w["limits"]) for w in queue] == [
        (1, 3, 1, holder, 1),
        (2, 0, 1, None, 1),
    ]
    assert queue[0]["enqueued"] > queue[1]["enqueued"]
    r = await client.get(f"{V2}/db/queue", params={"limit": 1})
    assert [w["priority"] for w in r.json()] == [3]
    assert (await client.get(f"{V2}/nothing/queue")).json() == NOT_FOUND
    assert (await client.get(f"{V2}/db/queue", params={"limit": 201})).status_code == 422
    first.cancel()
    urgent.cancel()


async def test_stats_answer_grants_and_waits_per_bucket(client: httpx.AsyncClient, clock: FakeClock) -> None:
    clock.now = 1_800_000_000.0
    await create(client, "db")
    held = await lease(client, "db")
    waiting = asyncio.ensure_future(
        client.post(f"{V2}/increment-with-lease", json={"names": ["db"], "slots": 1, "wait_seconds": 60})
    )
    await queued(client, "db", 1)
    clock.advance(3.0)
    r = await client.post(f"{V2}/decrement-with-lease", json={"lease_id": held})
    assert r.status_code == 204
    assert (await waiting).status_code == 200
    clock.now = 1_800_000_030.0

    r = await client.get(f"{V2}/db/stats", params={"window_seconds": 120, "bucket_seconds": 60})
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["bucket_seconds"] == 60
    assert [(b["start"], b["seconds"], b["grants"]) for b in stats["buckets"]] == [
        ("2027-01-15T07:59:00.000000Z", 60.0, 0),
        ("2027-01-15T08:00:00.000000Z", 30.0, 2),
    ]
    last = stats["buckets"][-1]
    assert last["grants_per_second"] == pytest.approx(2 / 30)
    assert last["wait_seconds"] == {"p50": 0.0, "p90": 3.0, "p99": 3.0, "max": 3.0}
    assert stats["buckets"][0]["wait_seconds"] == {"p50": None, "p90": None, "p99": None, "max": None}


@pytest.mark.parametrize(
    "params",
    [
        {"window_seconds": 0},
        {"window_seconds": 86401},
        {"bucket_seconds": 0.5},
        {"window_seconds": 86400, "bucket_seconds": 1},
        {"window_seconds": "an hour"},
    ],
)
async def test_stats_refuse_a_bad_window(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    await create(client, "db")
    r = await client.get(f"{V2}/db/stats", params=params)
    assert r.status_code == 422, r.text


async def test_an_operator_ends_a_lease_over_http(client: httpx.AsyncClient) -> None:
    await create(client, "db")
    held = await lease(client, "db")
    r = await client.delete(f"{V2}/leases/{held}")
    assert (r.status_code, r.content) == (204, b"")
    assert (await client.get(f"{V2}/db")).json()["active_slots"] == 0
    # Gone for its holder and for the operator alike.
    r = await client.post(f"{V2}/leases/{held}/renew", json={"lease_duration": 60})
    assert (r.status_code, r.json()) == (410, LEASE_GONE)
    r = await client.delete(f"{V2}/leases/{held}")
    assert (r.status_code, r.json()) == (410, LEASE_GONE)
    r = await client.delete(f"{V2}/leases/not-a-uuid")
    assert r.status_code == 422
    events = (await client.post("/events/filter", json={"filter": {"order": "ASC"}})).json()["events"]
    released = [e for e in events if e["event"] == "prefect.concurrency-limit.released"]
    assert [e["payload"] for e in released] == [{"reason": "operator"}]


async def test_the_dashboard_is_served_and_asks_a_browser_to_sign_in(
    storage: Storage, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, api_auth_string="admin:secret")
    app = create_app(settings, storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for path in ("/", "/dashboard", "/dashboard/assets/app.js"):
                r = await http.get(path)
                assert r.status_code == 401, path
                assert r.headers["www-authenticate"] == 'Basic realm="slotkeeper", charset="UTF-8"'
            # The API's 401 stays Prefect's (with the code every error has), and no challenge.
            r = await http.post(f"/api{V2}/overview", json={})
            assert (r.status_code, r.json()) == (
                401,
                {"exception_message": "Unauthorized", "code": "unauthorized"},
            )
            assert "www-authenticate" not in r.headers

            auth = {"Authorization": basic_auth("admin:secret")}
            r = await http.get("/dashboard", headers=auth)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/html")
            assert '<script type="module" src="/dashboard/assets/app.js">' in r.text
            for asset, kind in [
                ("app.js", "text/javascript"),
                ("style.css", "text/css"),
                ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
            ]:
                r = await http.get(f"/dashboard/assets/{asset}", headers=auth)
                assert (r.status_code, r.headers["content-type"].split(";")[0]) == (200, kind), asset
            r = await http.get("/", headers=auth)
            assert (r.status_code, r.headers["location"]) == (307, "/dashboard")
            r = await http.get("/dashboard/assets/missing.js", headers=auth)
            assert r.status_code == 404
