"""Shutdown (contract 2): waiting requests are answered 503 and keep their place in the queue.

Storage tier (both backends, fake clock): :meth:`Storage.detach_waiters` answers every waiting
request of the process with :class:`ShuttingDown` and its waiter id, and every new wait too; the
detached rows keep their order; a retry naming its waiter (``rejoin``) on another process takes
the place back, and collects a grant made while it was away (its lease starting again); a waiter
that never comes back is dropped by the sweeper after its hold, and what it was granted is
released to the next in line. Leases are untouched.

API tier: the 503 answer (``Retry-After``, ``code``, ``waiter_id``) and the ``waiter_id`` field.

The acceptance tests (real server processes and the SDK) are in ``test_shutdown_acceptance.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.errors import Conflict, ShuttingDown
from slotkeeper.models import AcquireRequest, Granted
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from slotkeeper.storage import queries as q
from slotkeeper.storage.waiting import DETACHED
from tests.conftest import FakeClock
from tests.test_queue import another_process, arrive, hold, lease_ids, make, outcome, settle, until, wanting

HOLD = 30.0


def rejoining(waiter_id: str) -> AcquireRequest:
    request = wanting("db")
    return AcquireRequest(
        request.names, request.slots, request.mode, request.lease, request.wait, request.priority, waiter_id
    )


async def owners(storage: Storage) -> list[tuple[str, str, str | None]]:
    """Every waiter row (id, owner, lease_id) in queue order."""
    rows = await storage.backend.run(
        lambda tx: tx.all("SELECT id, owner, lease_id FROM waiters ORDER BY priority DESC, sequence")
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def heartbeat(storage: Storage) -> None:
    """What the process's heartbeat does, at the fake clock's time."""
    await storage.backend.run(
        lambda tx: tx.write_now(q.TOUCH_WAITERS, {"now": storage.clock(), "owner": storage.owner})
    )


async def shut_down(storage: Storage, *tasks: asyncio.Task[Granted]) -> list[str]:
    """Detach ``storage``'s waiters; the waiter id each task was answered with, in order."""
    assert await storage.detach_waiters(1.0, HOLD) == len(tasks)
    ids = []
    for task in tasks:
        error = await outcome(task)
        assert isinstance(error, ShuttingDown), error
        assert error.retry_after == 1.0
        assert error.waiter_id is not None
        ids.append(error.waiter_id)
    return ids


async def test_waiters_are_answered_and_keep_their_places(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    held = await hold(storage, "db")
    first = await arrive(storage, clock, wanting("db"))
    second = await arrive(storage, clock, wanting("db"))
    before = [row[0] for row in await owners(storage)]

    ids = await shut_down(storage, first, second)

    assert ids == before  # each answer names its own place
    assert await owners(storage) == [(i, DETACHED, None) for i in ids]
    assert await lease_ids(storage, "db") == [held]  # held leases are untouched
    assert storage.waiting_requests == 0
    # A new waiting request is answered at once, without a place (it never had one).
    late = await outcome(asyncio.ensure_future(storage.acquire(wanting("db"))))
    assert isinstance(late, ShuttingDown) and late.waiter_id is None
    assert len(await owners(storage)) == 2


async def test_retries_on_another_process_keep_the_order_and_the_grants_made_meanwhile(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 1)
    held = await hold(storage, "db")
    first_id, second_id = await shut_down(
        storage, await arrive(storage, clock, wanting("db")), await arrive(storage, clock, wanting("db"))
    )
    other = another_process(storage)
    newcomer = await arrive(other, clock, wanting("db"))  # behind the detached places

    await other.release_lease(held)  # the head of the queue is granted while it is away
    assert [(i, lease is not None) for i, _, lease in await owners(other)][:2] == [
        (first_id, True),
        (second_id, False),
    ]
    clock.advance(10)
    second = asyncio.ensure_future(other.acquire(rejoining(second_id)))  # back first, still second

    async def taken_back() -> bool:
        return (second_id, other.owner, None) in await owners(other)

    await until(taken_back, "the second waiter is back")
    first = await settle(asyncio.ensure_future(other.acquire(rejoining(first_id))))

    assert first.lease_id is not None
    assert await lease_ids(other, "db") == [first.lease_id]
    # Its lease starts when it is answered, not when it was granted while nobody held it.
    leases = await other.list_leases("db")
    assert leases[0].expires == pytest.approx(clock() + 60.0)
    assert not second.done() and not newcomer.done()
    await other.release_lease(first.lease_id)
    granted = await settle(second)
    assert not newcomer.done()
    assert granted.lease_id is not None
    await other.release_lease(granted.lease_id)
    assert (await settle(newcomer)).lease_id is not None


async def test_a_retry_whose_place_is_gone_queues_again(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    await hold(storage, "db")
    other = another_process(storage)
    task = await arrive(other, clock, rejoining(str(uuid.uuid4())))
    assert [row[1] for row in await owners(other)] == [other.owner]
    task.cancel()
    await outcome(task)


async def test_a_retry_may_not_take_a_live_waiters_place(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    await hold(storage, "db")
    live = await arrive(storage, clock, wanting("db"))
    (waiter_id, _, _) = (await owners(storage))[0]
    with pytest.raises(Conflict):
        await another_process(storage).acquire(rejoining(waiter_id))
    assert not live.done()
    live.cancel()
    await outcome(live)


async def test_a_place_nobody_takes_back_is_dropped_and_its_grant_released(
    storage: Storage, clock: FakeClock
) -> None:
    await make(storage, "db", 1)
    held = await hold(storage, "db")
    (gone,) = await shut_down(storage, await arrive(storage, clock, wanting("db")))
    other = another_process(storage)
    behind = await arrive(other, clock, wanting("db"))
    await other.release_lease(held)  # granted to the detached waiter, which never comes back
    assert (await owners(other))[0][0] == gone
    assert not behind.done()

    clock.advance(HOLD - 1)
    await heartbeat(other)  # the waiter behind is alive (the fake clock outruns its heartbeats)
    await other.sweep_waiters()
    assert (await owners(other))[0][0] == gone  # still within its hold
    clock.advance(1.1)
    await heartbeat(other)
    await other.sweep_waiters()
    granted = await settle(behind)
    assert await lease_ids(other, "db") == [granted.lease_id]


# --- the API ---------------------------------------------------------------------------------------


async def test_the_answer_on_the_wire_and_the_retry_that_names_it(
    storage: Storage, clock: FakeClock, tmp_path: Path
) -> None:
    await make(storage, "db", 1)
    await hold(storage, "db")
    app = create_app(Settings(home=tmp_path), storage=storage)
    body = {"names": ["db"], "slots": 1, "lease_duration": 60, "wait_seconds": 600}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            waiting = asyncio.ensure_future(
                http.post("/v2/concurrency_limits/increment-with-lease", json=body)
            )
            await until(lambda: _is(storage.waiting_requests, 1), "the request waits")
            await storage.detach_waiters(1.5, HOLD)
            answer = await settle(waiting)
            assert answer.status_code == 503
            assert answer.headers["Retry-After"] == "1.5"
            payload = answer.json()
            assert payload["code"] == "shutting_down"
            assert payload["detail"]
            waiter_id = payload["waiter_id"]
            assert [row[0] for row in await owners(storage)] == [waiter_id]

            other = another_process(storage)
            other_app = create_app(Settings(home=tmp_path), storage=other)
            async with other_app.router.lifespan_context(other_app):
                other_http = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=other_app), base_url="http://t/api"
                )
                async with other_http:
                    retry = asyncio.ensure_future(
                        other_http.post(
                            "/v2/concurrency_limits/increment-with-lease",
                            json={**body, "waiter_id": waiter_id},
                        )
                    )
                    await until(lambda: _is(other.waiting_requests, 1), "the retry waits")
                    assert await owners(other) == [(waiter_id, other.owner, None)]
                    retry.cancel()
                    await outcome(retry)
                    bad = await other_http.post(
                        "/v2/concurrency_limits/increment-with-lease", json={**body, "waiter_id": "nope"}
                    )
                    assert bad.status_code == 422


async def _is(value: int, expected: int) -> bool:
    return value == expected
