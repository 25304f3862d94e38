"""Acceptance: SIGTERM a server with 50 SDK waiters queued; it exits in time and none loses out.

A limit of 1 is held (by the test, over HTTP); 50 SDK ``concurrency`` blocks in a client process
queue behind it. The server gets SIGTERM: it must exit within ``SLOTKEEPER_SHUTDOWN_GRACE_SECONDS``
plus 1 s (the one bound of this suite that is a duration: it is the contract, with seconds to
spare; an exit takes about 2 s here), having answered every waiter 503. The SDK retries on its
own; the waiters take their places back:

* SQLite: on the same server, restarted on the same database and port;
* PostgreSQL: on a second server process of the same database, which a small TCP balancer in
  front of both sends the new connections to once the first stops listening.

Then the held lease is released (it was untouched meanwhile), and every waiter must get its slot
in the order in which they had queued before the shutdown: each block reports the fencing token
of its grant, and the tokens follow the queue as read before the SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, clean_env

pytestmark = pytest.mark.slow

WAITERS = 50
GRACE = 10.0
CLIENT = """
import asyncio, json, sys
from slotkeeper.sdk.asyncio import concurrency

async def one(holder):
    async with concurrency("db", timeout_seconds=240, holder={"type": "task_run", "id": holder}) as lease:
        print(json.dumps({"holder": holder, "token": lease.fencing_tokens["db"]}), flush=True)
        await asyncio.sleep(0.01)

async def main(holders):
    results = await asyncio.gather(*(one(h) for h in holders), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    for error in failed:
        print(json.dumps({"error": repr(error)}), flush=True)
    sys.exit(1 if failed else 0)

asyncio.run(main(sys.argv[1:]))
"""


def acquire(server: ServerProcess) -> str:
    status, body = server.call(
        "POST",
        "/v2/concurrency_limits/increment-with-lease",
        {"names": ["db"], "slots": 1, "lease_duration": 600},
    )
    assert status == 200, body
    lease_id: str = body["lease_id"]
    return lease_id


def waiting(server: ServerProcess) -> int:
    """Requests waiting in the queue on this very server process (its own metric)."""
    with (
        contextlib.suppress(OSError),
        urllib.request.urlopen(server.url.removesuffix("/api") + "/metrics", timeout=5) as r,
    ):
        for line in r.read().decode().splitlines():
            if line.startswith("slotkeeper_waiting_requests "):
                return int(float(line.split()[-1]))
    return -1


def wait_for(condition: object, what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds  # a bound against hanging, not a timing claim
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def sigterm(server: ServerProcess) -> float:
    """SIGTERM the server; the seconds it took to exit (fails past the grace period + 1 s)."""
    process = server.process
    assert process is not None
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=GRACE + 1)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {GRACE + 1} s after SIGTERM:\n{server.log_text()}")
    server.process = None
    return time.monotonic() - started


def start_clients(tmp_path: Path, api_url: str, holders: list[str]) -> subprocess.Popen[bytes]:
    script = tmp_path / "clients.py"
    script.write_text(CLIENT)
    return subprocess.Popen(
        [sys.executable, str(script), *holders],
        env=clean_env(SLOTKEEPER_API_URL=api_url, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def grants_in_order(clients: subprocess.Popen[bytes]) -> list[str]:
    """The holders in the order of their fencing tokens (fails if a block failed)."""
    try:
        out, err = clients.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        clients.kill()
        out, err = clients.communicate()
        pytest.fail(f"the clients did not finish:\n{out.decode()}\n{err.decode()}")
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert clients.returncode == 0, (lines, err.decode()[-3000:])
    return [line["holder"] for line in sorted(lines, key=lambda line: line["token"])]


def queue_order(server: ServerProcess, database: str) -> list[str]:
    """The holders of the queued waiters, in queue order, read from the database."""
    query = "SELECT holder_id FROM waiters ORDER BY priority DESC, sequence"
    if database.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(database.removeprefix("sqlite:///"))) as conn:
            return [r[0] for r in conn.execute(query)]
    import psycopg

    with psycopg.connect(database) as conn:
        return [r[0] for r in conn.execute(query)]


def test_sqlite_waiters_come_back_to_the_restarted_server_in_order(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'server' / 'db.sqlite'}"
    with ServerProcess(tmp_path / "server", SLOTKEEPER_DATABASE_URL=database) as server:
        assert server.call("POST", "/v2/concurrency_limits/", {"name": "db", "limit": 1})[0] == 201
        held = acquire(server)
        holders = [str(uuid.uuid4()) for _ in range(WAITERS)]
        clients = start_clients(tmp_path, server.url, holders)
        try:
            wait_for(
                lambda: waiting(server) == WAITERS and len(queue_order(server, database)) == WAITERS,
                f"{WAITERS} waiters queued",
            )
            before = queue_order(server, database)
            assert sorted(before) == sorted(holders)

            took = sigterm(server)
            assert took <= GRACE + 1
            assert queue_order(server, database) == before  # the places are kept, detached
            server.start()  # same port, same database
            wait_for(lambda: waiting(server) == WAITERS, "the waiters back, waiting on the new process")
            assert server.call("GET", "/v2/concurrency_limits/db/leases")[1][0]["lease_id"] == held
            assert (
                server.call("POST", "/v2/concurrency_limits/decrement-with-lease", {"lease_id": held})[0]
                == 204
            )
            assert grants_in_order(clients) == before
        finally:
            if clients.poll() is None:
                clients.kill()
                clients.wait()


@contextlib.asynccontextmanager
async def balancer(ports: list[int]) -> AsyncIterator[int]:
    """A TCP balancer: each new connection goes to the first of ``ports`` that accepts it."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    writers: set[asyncio.StreamWriter] = set()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        writers.add(client_writer)
        for port in ports:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            writers.add(writer)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))
            return
        client_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:  # the pipes see the end of their streams and finish
            writer.close()
        await asyncio.sleep(0.1)


@pytest.mark.postgres
async def test_postgres_waiters_move_to_the_other_server_in_order(
    private_postgres_url: str, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(
            ServerProcess(tmp_path / "a", SLOTKEEPER_DATABASE_URL=private_postgres_url)
        )
        second = stack.enter_context(
            ServerProcess(tmp_path / "b", SLOTKEEPER_DATABASE_URL=private_postgres_url)
        )
        assert first.call("POST", "/v2/concurrency_limits/", {"name": "db", "limit": 1})[0] == 201
        held = acquire(first)
        holders = [str(uuid.uuid4()) for _ in range(WAITERS)]
        async with balancer([first.port, second.port]) as port:
            clients = start_clients(tmp_path, f"http://127.0.0.1:{port}/api", holders)
            try:
                await asyncio.to_thread(
                    wait_for,
                    lambda: (
                        waiting(first) == WAITERS and len(queue_order(first, private_postgres_url)) == WAITERS
                    ),
                    f"{WAITERS} waiters queued",
                )
                before = queue_order(first, private_postgres_url)
                assert sorted(before) == sorted(holders)

                took = await asyncio.to_thread(sigterm, first)
                assert took <= GRACE + 1
                await asyncio.to_thread(
                    wait_for, lambda: waiting(second) == WAITERS, "every waiter waiting on the second server"
                )
                assert queue_order(second, private_postgres_url) == before
                status, _ = second.call(
                    "POST", "/v2/concurrency_limits/decrement-with-lease", {"lease_id": held}
                )
                assert status == 204
                assert await asyncio.to_thread(grants_in_order, clients) == before
            finally:
                if clients.poll() is None:
                    clients.kill()
                    clients.wait()
