"""A grant whose answer cannot be delivered is released, over real HTTP connections.

uvicorn serves the app in this process with slotkeeper's protocol
(:class:`slotkeeper.api.protocol.HttpToolsProtocol`), on the test's event loop, so the test can
end a client's connection at an exact step of the server's work: ``k`` turns of the loop after
the work that grants the request began. At every step, either the client reads the grant (and
releases it), or the server releases it: no lease is ever left held that no client has seen.

With uvicorn's own protocols (``http="httptools"`` or ``"h11"``) the waiting sweep fails on
SQLite at step 3 (PostgreSQL: step 0): the client's half-close closes the transport, uvicorn
marks the request disconnected one turn later, and in that turn the grant is written into the
closed transport and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn

from slotkeeper.api.app import create_app
from slotkeeper.api.protocol import HttpToolsProtocol
from slotkeeper.models import LimitSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import take

V2 = "/api/v2/concurrency_limits"
#: Bound on "until this happens" loops: a broken server fails the test instead of hanging it.
PATIENCE = 30.0
#: Bound on the steps (turns of the loop) swept. Every step up to :data:`EVERY`, then a tenth more
#: each time, until the answer has been written before the close at :data:`DELIVERED` steps in a
#: row: on SQLite after about ten steps, on PostgreSQL (transactions on threads) a few thousand.
MAX_STEPS = 100_000
EVERY = 32
DELIVERED = 3
LEASE = {"names": ["db"], "slots": 1, "mode": "concurrency", "lease_duration": 60}


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    """slotkeeper's HTTP protocol serving ``app`` on a free port in this process."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", access_log=False, http=HttpToolsProtocol, ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done(), "uvicorn started")
        assert not task.done(), "uvicorn stopped before it started"
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        await task
        sock.close()


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        done = condition()
        if done if isinstance(done, bool) else await done:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.002)


def after_steps(k: int, action: Callable[[], None]) -> None:
    """Run ``action`` ``k`` turns of the event loop from now (0: at once)."""
    if k == 0:
        action()
    else:
        asyncio.get_running_loop().call_soon(after_steps, k - 1, action)


def message(body: dict[str, Any]) -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"POST {V2}/increment-with-lease HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def queued(storage: Storage) -> bool:
    rows = await storage.backend.run(lambda tx: tx.all("SELECT id FROM waiters WHERE lease_id IS NULL"))
    return len(rows) == 1


class Sweep:
    """What one step ended with: the grant read by the client, or released by the server."""

    def __init__(self, storage: Storage, server: uvicorn.Server) -> None:
        self.storage = storage
        self.server = server
        self.delivered = 0
        self.withdrawn = 0
        self.in_a_row = 0

    def steps(self) -> Iterator[int]:
        """The steps to try, until the answer came first :data:`DELIVERED` times in a row."""
        k = 0
        while self.in_a_row < DELIVERED:
            if k > MAX_STEPS:
                pytest.fail(f"the answer never came before the close in {MAX_STEPS} steps")
            yield k
            k = k + 1 if k < EVERY else k + k // 10

    async def settle(self, k: int, answer: bytes) -> None:
        # Every request the server was serving has finished (the client's connection is closed).
        await until(lambda: not self.server.server_state.tasks, "the server's requests finished")
        if answer.startswith(b"HTTP/1.1 200"):
            self.delivered += 1
            self.in_a_row += 1
            lease_id = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["lease_id"]
            held = [lease.lease_id for lease in await self.storage.list_leases("db")]
            assert held == [lease_id], f"step {k}: the grant the client read is held"
            await self.storage.release_lease(lease_id)
            return
        # Released by the request as it withdrew or answered, or (granted once the wait had left)
        # by the hand-over: either may still be committing.
        self.withdrawn += 1
        self.in_a_row = 0
        assert answer == b"", f"step {k}: {answer[:60]!r}"

        async def released() -> bool:
            return not await self.storage.list_leases("db")

        await until(released, f"step {k}: a lease no client saw is released")


@pytest.fixture
async def limit(storage: Storage) -> Storage:
    await storage.create_limit(LimitSpec(name="db", limit=1))
    return storage


async def test_a_waiting_grant_is_released_when_its_client_leaves_at_any_step(
    limit: Storage, tmp_path: Path
) -> None:
    # A waiting request is granted by the release of the lease ahead of it; its client half-closes
    # (the SDK's withdrawal) k turns of the loop after that release began, for every k up to the
    # answer.
    storage = limit
    async with served(create_app(Settings(home=tmp_path), storage=storage)) as (port, server):
        sweep = Sweep(storage, server)
        for k in sweep.steps():
            ahead = await take(storage, "db")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(message({**LEASE, "wait_seconds": 60}))
            await until(lambda: queued(storage), "the request queued")
            releasing = asyncio.create_task(storage.release_lease(str(ahead.lease_id)))
            after_steps(k, writer.write_eof)
            answer = await asyncio.wait_for(reader.read(), PATIENCE)  # until the server closes
            writer.close()
            await releasing
            await sweep.settle(k, answer)
    # The client left before its answer at the first steps (the sweep ends with answers read).
    assert sweep.withdrawn


async def test_a_grant_is_released_when_its_client_leaves_at_any_step(limit: Storage, tmp_path: Path) -> None:
    # The same without waiting (Prefect's own request): the client closes its end k turns of the
    # loop after its request was written, for every k up to the answer.
    storage = limit
    async with served(create_app(Settings(home=tmp_path), storage=storage)) as (port, server):
        sweep = Sweep(storage, server)
        for k in sweep.steps():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(message(LEASE))
            after_steps(k, writer.write_eof)
            answer = await asyncio.wait_for(reader.read(), PATIENCE)
            writer.close()
            await sweep.settle(k, answer)
    assert sweep.withdrawn
