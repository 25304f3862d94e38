"""Acceptance: two real server processes on one PostgreSQL database never over-grant a limit.

Two server processes share the database; many concurrent clients acquire with a lease on one
server and release on the other. Each client counts itself as a holder only between its 200 and
its release request, so the number of holders the clients see at once is at most the number the
servers granted: it must never exceed the limit. Every answer must be 200 or 423 (never 5xx), and
afterwards both servers must report the limit empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ServerProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LIMIT = 3
CLIENTS = 24
ATTEMPTS = 20  # acquisitions tried by each client


@pytest.fixture
def servers(private_postgres_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two server processes on a database of their own (other tests truncate the shared one);
    their base URLs. Always stopped."""
    with contextlib.ExitStack() as stack:
        bases = []
        for i in range(2):
            server = ServerProcess(tmp_path / f"server{i}", SLOTKEEPER_DATABASE_URL=private_postgres_url)
            stack.enter_context(server)
            bases.append(server.url.removesuffix("/api"))
        yield bases


async def test_two_servers_never_grant_more_than_the_limit(servers: list[str]) -> None:
    name = f"shared-{secrets.token_hex(4)}"
    acquire_statuses: Counter[int] = Counter()
    release_statuses: Counter[int] = Counter()
    holders = 0
    peak = 0
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(
            f"{servers[0]}/api/v2/concurrency_limits/", json={"name": name, "limit": LIMIT}
        ) as r:
            assert r.status == 201, await r.text()

        async def client(number: int) -> None:
            nonlocal holders, peak
            here, there = servers[number % 2], servers[(number + 1) % 2]
            for _ in range(ATTEMPTS):
                async with http.post(
                    f"{here}/api/v2/concurrency_limits/increment-with-lease",
                    json={"names": [name], "slots": 1, "lease_duration": 60},
                ) as answer:
                    acquire_statuses[answer.status] += 1
                    if answer.status != 200:
                        if answer.status == 423:
                            assert float(answer.headers["Retry-After"]) > 0
                        await answer.read()
                        await asyncio.sleep(0.01)
                        continue
                    lease_id = (await answer.json())["lease_id"]
                holders += 1
                peak = max(peak, holders)
                await asyncio.sleep(0.05)
                holders -= 1
                # Released through the other process: the lease lives in the database, not in
                # the server that granted it.
                async with http.post(
                    f"{there}/api/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease_id}
                ) as answer:
                    release_statuses[answer.status] += 1
                    await answer.read()

        await asyncio.gather(*(client(n) for n in range(CLIENTS)))

        assert set(acquire_statuses) <= {200, 423}, acquire_statuses
        assert set(release_statuses) == {204}, release_statuses
        assert peak <= LIMIT, f"{peak} holders at once on a limit of {LIMIT}"
        assert acquire_statuses[200] > 0
        assert acquire_statuses[423] > 0, "no contention: the test proved nothing"
        assert release_statuses[204] == acquire_statuses[200]
        for base in servers:
            async with http.get(f"{base}/api/v2/concurrency_limits/{name}") as r:
                assert r.status == 200
                assert (await r.json())["active_slots"] == 0
            async with http.get(f"{base}/api/v2/concurrency_limits/{name}/leases") as r:
                assert r.status == 200
                assert await r.json() == []
