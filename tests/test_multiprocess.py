"""Acceptance: two real server processes on one PostgreSQL database never over-grant a limit.

Two uvicorn processes share the database; many concurrent clients acquire with a lease on one
server and release on the other. Each client counts itself as a holder only between its 200 and
its release request, so the number of holders the clients see at once is at most the number the
servers granted: it must never exceed the limit. Every answer must be 200 or 423 (never 5xx), and
afterwards both servers must report the limit empty.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import psycopg
import pytest

from slotkeeper.storage import migrate
from tests.conftest import truncate_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LIMIT = 3
CLIENTS = 24
ATTEMPTS = 20  # acquisitions tried by each client
ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def shared_database(postgres_url: str) -> Iterator[str]:
    """A database for these servers alone (other tests truncate the shared one), emptied first."""
    name = f"slotkeeper_mp_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urlsplit(postgres_url)._replace(path=f"/{name}").geturl()
    try:
        migrate(url)
        truncate_postgres(url)
        yield url
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _wait_healthy(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server {base} exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/api/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    pytest.fail(f"server {base} not healthy after {STARTUP_SECONDS} s:\n{log.read_text()}")


@pytest.fixture
def servers(shared_database: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two server processes on ``shared_database``; their base URLs. Always terminated."""
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    bases: list[str] = []
    try:
        for i in range(2):
            port = _free_port()
            home = tmp_path / f"server{i}"
            home.mkdir()
            log = tmp_path / f"server{i}.log"
            env = {
                **os.environ,
                "SLOTKEEPER_DATABASE_URL": shared_database,
                "SLOTKEEPER_HOME": str(home),
            }
            with log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "uvicorn",
                            "slotkeeper.api.app:create_app",
                            "--factory",
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(port),
                            "--log-level",
                            "warning",
                        ],
                        env=env,
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            logs.append(log)
            bases.append(f"http://127.0.0.1:{port}")
        for process, base, log in zip(processes, bases, logs, strict=True):
            _wait_healthy(process, base, log)
        yield bases
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
