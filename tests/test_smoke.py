from __future__ import annotations

import httpx

from tests.conftest import FakeClock


async def test_acquire_release_roundtrip(client: httpx.AsyncClient, clock: FakeClock) -> None:
    r = await client.post("/v2/concurrency_limits/", json={"name": "db", "limit": 1})
    assert r.status_code == 201
    r = await client.post("/v2/concurrency_limits/increment-with-lease", json={"names": ["db"], "slots": 1})
    assert r.status_code == 200
    lease = r.json()["lease_id"]
    r = await client.post("/v2/concurrency_limits/increment-with-lease", json={"names": ["db"], "slots": 1})
    assert r.status_code == 423
    r = await client.post("/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease})
    assert r.status_code == 204
    assert (await client.get("/v2/concurrency_limits/db")).json()["active_slots"] == 0
