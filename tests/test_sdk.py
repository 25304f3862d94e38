"""The SDK (:mod:`slotkeeper.sdk`) against real server processes.

Acceptance tier (``slow``): a ``slotkeeper server start`` process on SQLite (with basic auth, and
a 1 s minimum lease so renewals and losses can be shown quickly), shared by the module; tests
that stop and restart a server get one of their own. The unit tests at the end need no server:
the bridge between callers and the SDK's loop (:class:`slotkeeper.sdk._runtime.Call`), the reading
of a server's refusals, the retries of the request loops against scripted answers, and the
half-close withdrawal against a scripted fake server.

Nothing here asserts a duration: waits are bounded only so that a broken SDK fails instead of
hanging, and "the server queued it" is read from the server's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import pytest

from slotkeeper.client import SlotkeeperClient
from slotkeeper.error_answers import api_error
from slotkeeper.errors import ClientError, ServerUnreachable
from slotkeeper.sdk import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencyLeaseLostError,
    ConcurrencySlotAcquisitionError,
    Lease,
    _core,
    _retry,
    _runtime,
    _wire,
    aconcurrency,
    arate_limit,
    concurrency,
    rate_limit,
)
from slotkeeper.sdk import v1 as sdk_v1
from slotkeeper.sdk._runtime import Endpoint, runtime
from tests.conftest import ServerProcess, free_port

AUTH = "sdk:s3cret"
#: Bound on "until this happens" loops: a broken SDK fails the test instead of hanging it.
PATIENCE = 60.0
V2 = "/v2/concurrency_limits"


# --- servers ------------------------------------------------------------------------------------


class Server(ServerProcess):
    """A ``slotkeeper server start`` process (basic auth on, leases from 1 s) that a test may stop
    and start again (same port, same ``SLOTKEEPER_HOME``)."""

    def __init__(self, home: Path, **settings: str) -> None:
        super().__init__(home, SLOTKEEPER_API_AUTH_STRING=AUTH, SLOTKEEPER_LEASE_MIN_SECONDS="1", **settings)

    def client(self) -> SlotkeeperClient:
        return SlotkeeperClient(self.url, AUTH)

    def create(self, name: str, limit: int, **fields: Any) -> None:
        status, body = self.call("POST", f"{V2}/", {"name": name, "limit": limit, **fields})
        assert status == 201, body

    def active_slots(self, name: str) -> int:
        status, body = self.call("GET", f"{V2}/{name}")
        assert status == 200, body
        return int(body["active_slots"])

    def leases(self, name: str) -> list[dict[str, Any]]:
        status, body = self.call("GET", f"{V2}/{name}/leases")
        assert status == 200, body
        return list(body)

    def queued(self) -> int:
        """Waiters the server has queued and not granted (read from its database)."""
        with contextlib.closing(
            sqlite3.connect(f"file:{self.home / 'slotkeeper.db'}?mode=ro", uri=True)
        ) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM waiters WHERE lease_id IS NULL").fetchone()
            return int(count)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server on SQLite for the module (basic auth on, leases from 1 s)."""
    with Server(tmp_path_factory.mktemp("sdk-home")) as running:
        yield running


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server of this test's own, which it may stop and restart."""
    with Server(tmp_path) as running:
        yield running


@pytest.fixture(params=["session", "http"])
def sdk_protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test runs over each transport of the SDK (``SLOTKEEPER_SDK_PROTOCOL``): its endpoints
    are made again, before and after."""
    monkeypatch.setenv("SLOTKEEPER_SDK_PROTOCOL", request.param)
    forget_endpoints()
    yield str(request.param)
    forget_endpoints()


def forget_endpoints() -> None:
    rt = runtime()
    endpoints = list(rt.endpoints.values())
    rt.endpoints.clear()
    for endpoint in endpoints:
        rt.loop.call_soon_threadsafe(endpoint.close)


@pytest.fixture
def fast_renewals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Renew every 2% of the lease and back off at most 0.5 s: seconds instead of minutes."""
    monkeypatch.setattr(_core, "RENEW_FRACTION", 0.02)
    monkeypatch.setattr(_retry, "BACKOFF_CAP_SECONDS", 0.5)


def unique(prefix: str = "sdk") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (blocking) until ``condition()``; fail after :data:`PATIENCE`."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


async def auntil(condition: Callable[[], bool], what: str) -> None:
    """Wait (yielding to the loop) until ``condition()``; fail after :data:`PATIENCE`."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def queued(server: Server, count: int) -> None:
    await auntil(lambda: server.queued() == count, f"{count} waiter(s) queued on the server")


# --- holding and releasing ------------------------------------------------------------------------


@pytest.mark.slow
def test_sync_block_holds_its_slots_and_releases_them(server: Server) -> None:
    name = unique()
    server.create(name, 3)
    holder = {"type": "task_run", "id": str(uuid.uuid4())}
    with concurrency(name, occupy=2, holder=holder, client=server.client()) as lease:
        assert isinstance(lease, Lease)
        assert lease.lease_id is not None and not lease.lost
        assert [lim.name for lim in lease.limits] == [name]
        assert lease.fencing_tokens == {name: 1}
        assert server.active_slots(name) == 2
        (listed,) = server.leases(name)
        assert listed["lease_id"] == lease.lease_id
        assert listed["slots"] == 2
        assert listed["holder"] == holder
    assert server.active_slots(name) == 0
    assert server.leases(name) == []


@pytest.mark.slow
async def test_async_block_holds_every_limit_and_releases_them(server: Server) -> None:
    a, b = unique(), unique()
    server.create(a, 1)
    server.create(b, 2)
    async with aconcurrency([b, a, b], client=server.client()) as lease:
        assert sorted(lim.name for lim in lease.limits) == sorted([a, b])
        assert (server.active_slots(a), server.active_slots(b)) == (1, 1)
    assert (server.active_slots(a), server.active_slots(b)) == (0, 0)


@pytest.mark.slow
def test_the_body_raising_still_releases(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    with pytest.raises(ZeroDivisionError), concurrency(name, client=server.client()):
        assert server.active_slots(name) == 1
        _ = 1 / 0
    assert server.active_slots(name) == 0


@pytest.mark.slow
def test_configuration_from_the_environment(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique()
    server.create(name, 1)
    monkeypatch.setenv("SLOTKEEPER_API_URL", server.url)
    monkeypatch.setenv("SLOTKEEPER_API_AUTH_STRING", AUTH)
    with concurrency(name) as lease:
        assert lease.lease_id is not None
        assert server.active_slots(name) == 1
    monkeypatch.setenv("SLOTKEEPER_API_AUTH_STRING", "sdk:wrong")
    with (
        pytest.raises(
            ConcurrencySlotAcquisitionError, match=r"^Unable to acquire concurrency slots on \[.*\]: 401"
        ),
        concurrency(name),
    ):
        pass


def test_no_names_hold_nothing_and_send_nothing() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/api"  # nothing listens: any request would fail
    nothing: list[str | list[str] | None] = [[], None, ""]
    for names in nothing:
        with concurrency(names, api_url=nowhere) as lease:
            assert lease.lease_id is None and lease.limits == ()
        rate_limit(names, api_url=nowhere)


def test_the_sdk_defaults_to_the_servers_url_and_does_not_import_aiohttp() -> None:
    from slotkeeper import client
    from slotkeeper.sdk import _blocks

    assert _blocks.DEFAULT_API_URL == client.DEFAULT_API_URL
    probe = "import sys, slotkeeper.sdk, slotkeeper.sdk.v1; print('aiohttp' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


def test_a_url_that_is_not_one_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="Not an API URL"):
        concurrency("db", api_url="localhost:4200")


@pytest.mark.slow
async def test_missing_limits_run_the_body_unless_strict(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("missing")
    with caplog.at_level(logging.WARNING, "slotkeeper.sdk"):
        async with aconcurrency(name, client=server.client()) as lease:
            assert lease.lease_id is None and lease.limits == ()
    assert f"Concurrency limits ['{name}'] do not exist - skipping acquisition." in caplog.messages
    with pytest.raises(
        ConcurrencySlotAcquisitionError,
        match=rf"^Concurrency limits \['{name}'\] must be created before acquiring slots$",
    ):
        async with aconcurrency(name, strict=True, client=server.client()):
            pytest.fail("the body must not run")


@pytest.mark.slow
async def test_inactive_limits_are_held_but_never_block(server: Server) -> None:
    name = unique()
    server.create(name, 0, active=False)
    async with aconcurrency(name, client=server.client()) as lease:
        assert [lim.name for lim in lease.limits] == [name]
        assert [x["lease_id"] for x in server.leases(name)] == [lease.lease_id]
    assert server.leases(name) == []


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_protocol")
async def test_errors_read_as_prefects(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    client = server.client()
    with pytest.raises(
        ConcurrencySlotAcquisitionError,
        match=rf"^Unable to acquire concurrency slots on \['{name}'\]: 422 Unprocessable Entity: "
        r"Slots requested is greater than the limit$",
    ):
        async with aconcurrency(name, occupy=2, client=client):
            pass
    async with aconcurrency(name, client=client):
        with pytest.raises(
            ConcurrencySlotAcquisitionError,
            match=rf"^Unable to acquire concurrency slots on \['{name}'\]: 423 Locked: Locked$",
        ):
            async with aconcurrency(name, max_retries=0, client=client):
                pass
    assert issubclass(ConcurrencySlotAcquisitionError, ClientError)
    assert issubclass(AcquireConcurrencySlotTimeoutError, ClientError)
    assert issubclass(AcquireConcurrencySlotTimeoutError, TimeoutError)
    assert issubclass(ConcurrencyLeaseLostError, ConcurrencySlotAcquisitionError)


# --- waiting on the server ------------------------------------------------------------------------


@pytest.mark.slow
async def test_waiters_are_served_in_arrival_order(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    client = server.client()
    served: list[int] = []

    async def worker(i: int) -> None:
        async with aconcurrency(name, client=client):
            served.append(i)

    async with aconcurrency(name, client=client):
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(worker(i)))
            await queued(server, i + 1)  # the next one arrives after this one is in the queue
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3, 4]
    assert server.active_slots(name) == 0 and server.queued() == 0


@pytest.mark.slow
async def test_a_higher_priority_is_served_first(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    client = server.client()
    served: list[str] = []

    async def worker(label: str, priority: int) -> None:
        async with aconcurrency(name, priority=priority, client=client):
            served.append(label)

    async with aconcurrency(name, client=client):
        tasks = []
        for count, (label, priority) in enumerate([("low", -5), ("mid", 0), ("high", 9), ("mid2", 0)], 1):
            tasks.append(asyncio.create_task(worker(label, priority)))
            await queued(server, count)
    await asyncio.gather(*tasks)
    assert served == ["high", "mid", "mid2", "low"]


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_protocol")
async def test_a_waiter_is_not_passed_by_a_newcomer_between_its_requests(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An acquisition whose first request was refused (423) and whose waiting request has not
    # reached the queue yet must not be passed by a newcomer that finds the slot free: the
    # holder leaves and a newcomer asks exactly in that window (if the SDK opens one), else once
    # the waiter is queued. The newcomer is refused either way; the waiter gets the slot.
    name = unique()
    server.create(name, 1)
    ask = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}
    status, holding = server.call("POST", f"{V2}/increment-with-lease", ask)
    assert status == 200
    newcomer: list[tuple[int, Any]] = []

    def leave_and_ask() -> None:
        if not newcomer:
            assert (
                server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": holding["lease_id"]})[0] == 204
            )
            newcomer.append(server.call("POST", f"{V2}/increment-with-lease", ask))

    exchange = _core.exchange

    async def in_the_window(
        ep: Endpoint, path: str, body: dict[str, Any], wait: float | None, remaining: float | None
    ) -> tuple[_wire.Answer, bool]:
        answered = await exchange(ep, path, body, wait, remaining)
        if body["names"] == [name] and answered[0][0] == 423:
            leave_and_ask()  # blocks the acquisition's loop for two requests: no waiting one is sent
        return answered

    monkeypatch.setattr(_core, "exchange", in_the_window)
    waiter = asyncio.create_task(aconcurrency(name, client=server.client()).__aenter__())
    await auntil(lambda: bool(newcomer) or server.queued() == 1, "the waiter refused or queued")
    leave_and_ask()
    ((status, took),) = newcomer
    if status == 200:  # served first: give its slot back, so that the waiter ends too
        server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": took["lease_id"]})
    lease = await asyncio.wait_for(waiter, PATIENCE)
    assert status == 423, "a newcomer was served before a waiter that asked first"
    assert [x["lease_id"] for x in server.leases(name)] == [lease.lease_id]
    await runtime().call(_core.release(lease)).aresult()


@pytest.mark.slow
def served_after_a_wait(server: Server) -> tuple[str, Lease, Lease]:
    """A sync block in a thread waits for a limit of 1 that this thread holds; once the server
    has queued it, the holder leaves. The limit, the holder's lease and the waiter's."""
    name = unique()
    server.create(name, 1)
    got: list[Lease] = []

    def waiter() -> None:
        with concurrency(name, client=server.client()) as lease:
            got.append(lease)

    with concurrency(name, client=server.client()) as first:
        thread = threading.Thread(target=waiter)
        thread.start()
        until(lambda: server.queued() == 1, "the waiter queued")
    thread.join(PATIENCE)
    assert not thread.is_alive()
    (lease,) = got
    return name, first, lease


@pytest.mark.slow
def test_a_sync_waiter_is_woken_by_the_release(server: Server) -> None:
    name, first, lease = served_after_a_wait(server)
    # The grant after a wait names its limits, with the next fencing token.
    assert lease.fencing_tokens == {name: first.fencing_tokens[name] + 1}


@pytest.mark.slow
async def test_timeout_raises_a_timeout_error_and_leaves_the_queue(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    async with aconcurrency(name, client=server.client()):
        with pytest.raises(
            AcquireConcurrencySlotTimeoutError,
            match=r"^Attempt to acquire concurrency slots timed out after 0.5 second\(s\)$",
        ):
            async with aconcurrency(name, timeout_seconds=0.5, client=server.client()):
                pytest.fail("the body must not run")
        assert server.queued() == 0
        assert len(server.leases(name)) == 1
    with (
        pytest.raises(TimeoutError),
        concurrency(name, timeout_seconds=0, client=server.client()),
        concurrency(name, timeout_seconds=0, client=server.client()),
    ):
        pass


@pytest.mark.slow
async def test_max_retries_counts_refusals(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    async with aconcurrency(name, client=server.client()):
        # 1 retry: the immediate request, then one wait (the rest of the 0.5 s timeout); its 423
        # exhausts the retries before the timeout is looked at.
        with pytest.raises(ConcurrencySlotAcquisitionError, match="423 Locked: Timed out after waiting"):
            async with aconcurrency(name, max_retries=1, timeout_seconds=0.5, client=server.client()):
                pass
    assert server.queued() == 0


@pytest.mark.slow
async def test_a_limit_that_does_not_exist_beside_a_full_one_is_polled(server: Server) -> None:
    # The server queues only on existing, active limits; Prefect drops missing names. The SDK
    # polls such a request (Retry-After) and is served when the full limit frees up.
    name, missing = unique(), unique("missing")
    server.create(name, 1)
    client = server.client()
    block = aconcurrency([name, missing], client=client)
    async with aconcurrency(name, client=client):
        waiter = asyncio.create_task(block.__aenter__())
        await asyncio.sleep(0.3)
        assert not waiter.done()
        assert server.queued() == 0
    lease = await asyncio.wait_for(waiter, PATIENCE)
    assert [lim.name for lim in lease.limits] == [name]
    await block.__aexit__(None, None, None)
    assert server.active_slots(name) == 0


@pytest.mark.slow
def test_a_lower_maximum_wait_is_learnt(tmp_path: Path) -> None:
    with Server(tmp_path, SLOTKEEPER_MAX_WAIT_SECONDS="1") as server:
        served_after_a_wait(server)  # waiting 1 s at a time
        key = (server.url, _wire.authorization(AUTH))
        assert runtime().endpoints[key].wait_chunk == 1.0


# --- cancellation ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_protocol")
async def test_cancelled_while_waiting_leaves_nothing_behind(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    client = server.client()
    async with aconcurrency(name, client=client) as holding:
        waiter = asyncio.create_task(aconcurrency(name, client=client).__aenter__())
        await queued(server, 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await queued(server, 0)  # withdrawn (a CANCEL on the session, a half-close over HTTP)
        assert [x["lease_id"] for x in server.leases(name)] == [holding.lease_id]
    await auntil(lambda: server.leases(name) == [], "nothing held")
    assert server.queued() == 0


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_protocol")
def test_an_interrupt_while_a_sync_block_waits_leaves_nothing_behind(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    main = threading.main_thread().ident
    assert main == threading.get_ident() and main is not None

    def interrupt() -> None:
        until(lambda: server.queued() == 1, "the waiter queued")
        signal.pthread_kill(main, signal.SIGINT)

    # A process started in the background by a shell (`cmd &`) ignores SIGINT from birth: the
    # interrupt would never come and the block would wait forever. Python's own handler is what
    # a user's Ctrl-C meets, so the test installs it for its duration.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with concurrency(name, client=server.client()) as holding:
            threading.Thread(target=interrupt).start()
            with pytest.raises(KeyboardInterrupt), concurrency(name, client=server.client()):
                pytest.fail("the body must not run")
            until(lambda: server.queued() == 0, "the wait withdrawn")
            assert [x["lease_id"] for x in server.leases(name)] == [holding.lease_id]
    finally:
        signal.signal(signal.SIGINT, previous)
    until(lambda: server.leases(name) == [], "nothing held")


class _SignalBeforeTheWait:
    """The lock a blocking call waits on, where a Ctrl-C came just before the wait began: its C
    handler ran, and Python runs the handler only when the wait returns (between instructions).
    An unbounded wait would never return (it fails the test instead of hanging it); a bounded
    one returns, and then the handler raises."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking=False):  # the wait: the outcome is not in
            if timeout < 0:
                raise AssertionError("an unbounded wait: the interrupt before it is never handled")
            signal.raise_signal(signal.SIGINT)
            return False
        return True

    def release(self) -> None:
        self._lock.release()


@pytest.mark.slow
def test_an_interrupt_just_before_a_sync_wait_still_interrupts_it(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # test_an_interrupt_while_a_sync_block_waits_leaves_nothing_behind hung under load (once in
    # 7 to 140 runs, on main too): the SIGINT landed between the last check for signals and the
    # main thread's wait, which then waited for the slot its own block held.
    name = unique()
    server.create(name, 1)
    real_lock = threading.Lock

    def lock() -> Any:  # the lock a call's outcome is waited on, not the call's own
        return _SignalBeforeTheWait() if sys._getframe(1).f_code.co_name == "result" else real_lock()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with concurrency(name, client=server.client()) as holding:
            monkeypatch.setattr(_runtime.threading, "Lock", lock)
            with pytest.raises(KeyboardInterrupt), concurrency(name, client=server.client()):
                pytest.fail("the body must not run")
            monkeypatch.undo()
            until(lambda: server.queued() == 0, "the wait withdrawn")
            assert [x["lease_id"] for x in server.leases(name)] == [holding.lease_id]
    finally:
        signal.signal(signal.SIGINT, previous)
    until(lambda: server.leases(name) == [], "nothing held")


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_protocol")
@pytest.mark.filterwarnings("ignore:coroutine 'acquire' was never awaited:RuntimeWarning")
def test_an_interrupt_at_every_step_of_entering_a_sync_block_leaves_nothing_held(
    server: Server,
) -> None:
    # A KeyboardInterrupt raised at each step (a function's start, each line) of the caller's
    # side of ``with concurrency(...)``, one step further each time, until the body is reached:
    # whatever the SDK had done (nothing sent, request sent, lease granted, held), nothing stays
    # held, and nothing waits. (An interrupt in the step that makes the acquisition's coroutine
    # leaves it never awaited: nothing was sent.)
    name = unique()
    server.create(name, 1)
    client = server.client()
    for step in range(1, 1000):
        block = concurrency(name, client=client)
        entered = False
        sys.settrace(_interrupting_at(step))
        try:
            with block:
                sys.settrace(None)
                entered = True
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        until(lambda: server.leases(name) == [] and server.queued() == 0, f"nothing held (step {step})")
        if entered:
            break
    else:
        pytest.fail("the block was never entered")
    assert step > 10  # the interrupts did land inside the SDK


def _interrupting_at(step: int) -> Callable[..., Any]:
    """A trace function that raises KeyboardInterrupt at the ``step``-th step of the SDK's code
    (a function's start, a line) in this thread."""
    sdk = str(Path(_runtime.__file__).parent)
    events = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal events
        if not frame.f_code.co_filename.startswith(sdk) or event not in ("call", "line"):
            return trace if event == "call" else None
        if event == "line" and _with_line(frame):
            # Also the step that calls __exit__, where Python itself checks for no signal (it
            # does after the call): an interrupt there is not one a Ctrl-C can make.
            return trace
        events += 1
        if events == step:
            sys.settrace(None)
            raise KeyboardInterrupt
        return trace

    return trace


def _with_line(frame: Any) -> bool:
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith("with ")


@pytest.mark.slow
async def test_cancelled_in_the_body_releases(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    inside = asyncio.Event()

    async def body() -> None:
        async with aconcurrency(name, client=server.client()):
            inside.set()
            await asyncio.sleep(PATIENCE)

    task = asyncio.create_task(body())
    await inside.wait()
    assert server.active_slots(name) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.active_slots(name) == 0  # released before the cancellation came out


@pytest.mark.slow
@pytest.mark.usefixtures("sdk_protocol")
async def test_cancelled_at_every_step_of_many_acquisitions_leaves_nothing_held(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancel waiters at arbitrary moments while others come and go: whatever each one was doing
    # (first request, waiting, granted on the wire, in its body), the SDK releases every lease it
    # received. What the server granted and never answered is the server's to release.
    name = unique()
    server.create(name, 2)
    client = server.client()
    received: set[str] = set()
    granted = _core.granted

    def recording(*args: Any) -> Lease:
        lease = granted(*args)
        if lease.lease_id is not None:
            received.add(lease.lease_id)
        return lease

    monkeypatch.setattr(_core, "granted", recording)

    async def worker() -> None:
        # Short leases: a lease the server leaked (see below) frees its slot in seconds.
        async with aconcurrency(name, lease_duration=2, client=client):
            await asyncio.sleep(0.002)

    for round_ in range(20):
        tasks = [asyncio.create_task(worker()) for _ in range(6)]
        await asyncio.sleep(0.001 * round_)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def held() -> set[str]:
        return {lease["lease_id"] for lease in server.leases(name)}

    await auntil(lambda: not held() & received, "every lease the SDK received released")
    assert not held(), "a lease no client ever saw is held"
    assert not server.queued(), "a withdrawn wait is still queued"


# --- renewal --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
@pytest.mark.usefixtures("sdk_protocol")
async def test_a_blocked_callers_loop_does_not_stop_the_renewals(server: Server) -> None:
    # The block acquires on this loop; its renewals run on the SDK's thread: this loop blocks
    # (no await) until the server has seen the lease renewed twice.
    name = unique()
    server.create(name, 1)
    seen: set[str] = set()

    def renewed_twice() -> bool:
        seen.update(x["expires"] for x in server.leases(name))
        return len(seen) >= 3

    async with aconcurrency(name, lease_duration=5, client=server.client()) as lease:
        until(renewed_twice, "the lease renewed twice while the loop of its block was blocked")
        assert not lease.lost
    assert server.leases(name) == []


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
@pytest.mark.usefixtures("sdk_protocol")
async def test_a_lost_lease_cancels_an_async_body(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    name = unique()
    server.create(name, 1)
    with pytest.raises(ConcurrencyLeaseLostError, match="was lost: the server no longer has it"):
        async with aconcurrency(name, lease_duration=60, strict=True, client=server.client()) as lease:
            assert server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": lease.lease_id})[0] == 204
            await asyncio.sleep(PATIENCE)  # interrupted by the loss
            pytest.fail("the body was not interrupted")
    assert lease.lost
    assert any(r.levelno == logging.ERROR and "Terminating execution" in r.message for r in caplog.records)


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
async def test_a_lost_lease_is_reported_when_the_body_ignores_the_cancellation(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    with pytest.raises(ConcurrencyLeaseLostError):
        async with aconcurrency(
            name, lease_duration=60, raise_on_lease_renewal_failure=True, client=server.client()
        ) as lease:
            server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": lease.lease_id})
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(PATIENCE)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the block took its cancellation back


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
def test_a_lost_lease_interrupts_a_sync_body(server: Server) -> None:
    name = unique()
    server.create(name, 1)
    steps = 0
    with (
        pytest.raises(ConcurrencyLeaseLostError),
        concurrency(name, lease_duration=60, strict=True, client=server.client()) as lease,
    ):
        server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": lease.lease_id})
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:  # pure Python work: interrupted at an instruction
            steps += 1
            time.sleep(0.001)
        pytest.fail("the body was not interrupted")
    assert lease.lost and steps > 0


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
def test_a_lost_lease_only_warns_when_not_strict(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    name = unique()
    server.create(name, 1)
    with concurrency(name, lease_duration=60, client=server.client()) as lease:
        server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": lease.lease_id})
        until(lambda: lease.lost, "the loss noticed")
    assert any(
        r.levelno == logging.WARNING and "Execution will continue" in r.message for r in caplog.records
    )


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
@pytest.mark.usefixtures("sdk_protocol")
def test_renewal_keeps_the_lease_through_a_server_restart(
    own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique()
    own_server.create(name, 1)
    caplog.set_level(logging.INFO, "slotkeeper.sdk")
    with concurrency(name, lease_duration=60, strict=True, client=own_server.client()) as lease:
        (before,) = own_server.leases(name)
        own_server.stop()
        until(lambda: any("Could not renew" in m for m in caplog.messages), "a renewal failed")
        own_server.start()  # same home: the lease is in the database
        until(lambda: any("renewed after" in m for m in caplog.messages), "a renewal after the restart")
        (after,) = own_server.leases(name)
        assert after["lease_id"] == before["lease_id"] == lease.lease_id
        assert after["expires"] > before["expires"]
        assert not lease.lost
    assert own_server.leases(name) == []


@pytest.mark.slow
@pytest.mark.usefixtures("fast_renewals")
def test_a_lease_that_expires_while_the_server_is_away_is_lost(
    own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique()
    own_server.create(name, 1)
    with concurrency(name, lease_duration=2, client=own_server.client()) as lease:
        own_server.stop()
        until(lambda: lease.lost, "the lease given up")
    assert any("could not be renewed before it expired" in m for m in caplog.messages)


@pytest.mark.slow
def test_an_acquisition_and_a_release_ride_out_a_server_restart(own_server: Server) -> None:
    # Refused connections while the server is away are retried (the one retry policy), within
    # the caller's timeout: the block runs once the server is back, and its release too.
    name = unique()
    own_server.create(name, 1)
    own_server.stop()
    outcome: list[Lease | BaseException] = []

    def block() -> None:
        try:
            with concurrency(
                name, timeout_seconds=PATIENCE, strict=True, client=own_server.client()
            ) as lease:
                outcome.append(lease)
                own_server.stop()  # the release meets a server that is away, too
                restarted.set()
        except BaseException as exc:
            outcome.append(exc)

    restarted = threading.Event()
    worker = threading.Thread(target=block)
    worker.start()
    own_server.start()
    assert restarted.wait(PATIENCE), outcome
    own_server.start()
    worker.join(PATIENCE)
    (lease,) = outcome
    assert isinstance(lease, Lease) and lease.lease_id is not None, lease
    assert own_server.leases(name) == []


# --- rate limits and tags -------------------------------------------------------------------------


@pytest.mark.slow
async def test_rate_limit_takes_decaying_slots(server: Server) -> None:
    name, flat = unique(), unique()
    server.create(name, 1, slot_decay_per_second=20.0)
    server.create(flat, 1)
    client = server.client()
    await arate_limit(name, client=client)
    await arate_limit(name, client=client)  # waits for the first slot to decay (Retry-After)
    rate_limit(name, client=client)
    with pytest.raises(ConcurrencySlotAcquisitionError, match="do not have a decay configured"):
        await arate_limit(flat, client=client)
    with pytest.raises(ConcurrencySlotAcquisitionError, match="must be created before acquiring slots"):
        await arate_limit(unique("missing"), strict=True, client=client)


@pytest.mark.slow
async def test_v1_tag_limits(server: Server) -> None:
    tag = unique("tag")
    status, _ = server.call("POST", "/concurrency_limits/", {"tag": tag, "concurrency_limit": 1})
    if status == 404:
        pytest.skip("the v1 endpoint /api/concurrency_limits is not on this server yet")
    assert status in (200, 201)
    run_a, run_b = uuid.uuid4(), uuid.uuid4()
    client = server.client()
    async with sdk_v1.aconcurrency(tag, run_a, client=client) as limits:
        assert [lim.name for lim in limits] == [tag]
        assert server.active_slots(f"tag:{tag}") == 1
        with pytest.raises(
            AcquireConcurrencySlotTimeoutError, match=r"concurrency limits timed out after 0\.3"
        ):
            async with sdk_v1.aconcurrency([tag], run_b, timeout_seconds=0.3, client=client):
                pass
    assert server.active_slots(f"tag:{tag}") == 0
    with sdk_v1.concurrency(tag, str(run_b), client=client):
        assert server.active_slots(f"tag:{tag}") == 1
    assert server.active_slots(f"tag:{tag}") == 0
    zero = unique("tag")
    server.call("POST", "/concurrency_limits/", {"tag": zero, "concurrency_limit": 0})
    with (
        pytest.raises(ConcurrencySlotAcquisitionError, match="is 0 and will deadlock"),
        sdk_v1.concurrency(zero, run_a, client=client),
    ):
        pass


# --- without a server: the bridge, the refusals, the withdrawal ------------------------------------


def test_a_result_nobody_waits_for_goes_to_the_orphan_handler() -> None:
    rt = runtime()
    adopted: list[str] = []

    async def orphan(result: str) -> None:
        adopted.append(result)

    async def grant_despite_cancellation() -> str:
        try:
            await asyncio.sleep(PATIENCE)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # like a request that is finished after a cancellation
        return "lease-1"

    # Abandoned before it started: it never runs.
    call = rt.call(grant_despite_cancellation(), orphan)
    call.abandon()
    # Abandoned while running: the coroutine still produced a grant; the orphan handler has it.
    call = rt.call(grant_despite_cancellation(), orphan)
    until(lambda: call._task is not None, "started")
    call.abandon()
    until(lambda: adopted == ["lease-1"], "the orphan released")

    async def quick() -> str:
        return "lease-2"

    # Finished, then the caller gives up before reading it (cancelled just after the answer).
    call = rt.call(quick(), orphan)
    until(lambda: call._state != _runtime._PENDING, "done")
    call.abandon()
    until(lambda: adopted == ["lease-1", "lease-2"], "the orphan released")

    async def cancelled_for_good() -> str:
        await asyncio.sleep(PATIENCE)
        return "never"

    # Abandoned, and the coroutine ends cancelled: nothing was granted, nothing to release.
    call = rt.call(cancelled_for_good(), orphan)
    until(lambda: call._task is not None, "started")
    call.abandon()
    until(lambda: call._task is not None and call._task.done(), "cancelled")
    assert rt.call(quick()).result() == "lease-2"
    assert adopted == ["lease-1", "lease-2"]


class _FakeRenewal:
    def __init__(self) -> None:
        self.stopped = False
        self.scheduled: list[float] = []

    def _schedule(self, when: float) -> None:
        self.scheduled.append(when)


def test_renewals_started_from_another_loop_are_scheduled_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    # From another thread, a renewal waits in a list (the SDK's loop is woken only for one due
    # sooner than the list's earliest); stopped ones are dropped as the list grows, and when the
    # earliest falls due the live ones get their timers, the stopped ones none.
    rt = runtime()
    monkeypatch.setattr(_runtime, "PRUNE_WAITING", 8)
    monkeypatch.setattr(rt, "_prune_at", 8)
    later = rt.loop.time() + 3600.0
    renewals = [_FakeRenewal() for _ in range(40)]
    for i, renewal in enumerate(renewals):
        rt.renew_at(renewal, later)
        if i % 4:
            renewal.stopped = True  # a short block: released before its renewal was due
    live = [r for r in renewals if not r.stopped]
    assert len(rt._waiting) <= 2 * len(live) + 8
    due = _FakeRenewal()
    rt.renew_at(due, rt.loop.time())  # due now: the SDK's loop takes the list in
    until(lambda: bool(due.scheduled), "the due renewal scheduled")
    assert all(r.scheduled == [later] for r in live)
    assert not any(r.scheduled for r in renewals if r.stopped)


def test_a_call_reports_its_error_to_either_kind_of_caller() -> None:
    rt = runtime()

    async def fails() -> None:
        raise ConcurrencySlotAcquisitionError("no")

    with pytest.raises(ConcurrencySlotAcquisitionError, match="no"):
        rt.call(fails()).result()

    async def main() -> None:
        with pytest.raises(ConcurrencySlotAcquisitionError, match="no"):
            await rt.call(fails()).aresult()

    asyncio.run(main())


def invalid(*errors: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A 422 in Prefect's validation shape (as slotkeeper's, without its code if ``code`` is
    left out of an error: a Prefect server)."""
    body = {"exception_message": "Invalid request received.", "exception_detail": list(errors)}
    return 422, {}, {**body, "request_body": {}}


def field(name: str, kind: str, msg: str, **ctx: Any) -> dict[str, Any]:
    """One of pydantic's validation errors about the body field ``name``."""
    return {"type": kind, "loc": ["body", name], "msg": msg, "input": 1, **({"ctx": ctx} if ctx else {})}


EXTRA = "Extra inputs are not permitted"
PREFECT_REFUSES_WAITS = invalid(
    field("wait_seconds", "extra_forbidden", EXTRA), field("priority", "extra_forbidden", EXTRA)
)


def test_what_a_422_to_a_wait_means() -> None:
    spec = _core.Spec(["a"], 1, None, None, 60.0, None, 0, False, ("http://127.0.0.1:1/api", None))
    ep = Endpoint("http://127.0.0.1:1/api", None)

    def refused(answer: tuple[int, dict[str, str], dict[str, Any]], wait: float = 10.0) -> str:
        status, headers, body = answer
        return _core.refused(ep, spec, wait, api_error(status, "", headers, orjson.dumps(body)))

    lower = field("wait_seconds", "less_than_equal", "Input should be less than or equal to 10", le=10.0)
    assert refused(invalid(lower), wait=55.0) == "again"
    assert (ep.waits, ep.wait_chunk) == (True, 10.0)
    for detail in ["Cannot wait for limits that do not exist: 'b'", "Cannot wait for inactive limits: 'a'"]:
        assert refused((422, {}, {"detail": detail, "code": "cannot_wait"})) == "poll"
    # The words do not matter, the code does: a refusal for another reason fails.
    slots = {"detail": "Slots requested is greater than the limit", "code": "slots_exceed_limit"}
    assert refused((422, {}, slots)) == "fail"
    assert refused((422, {}, {"detail": "Cannot wait for limits that do not exist: 'b'"})) == "fail"
    high = field("priority", "less_than_equal", "Input should be less than or equal to 1000", le=1000)
    assert refused(invalid(high)) == "fail"
    assert refused(PREFECT_REFUSES_WAITS) == "again"
    assert ep.waits is False  # a server without the queue: poll Retry-After from now on


class Scripted:
    """Stands in for the SDK's requests (``_core.exchange``): answers from a script (an exception
    in it is raised, as an unreachable server's), records what was sent (path end, whether it
    waited) and the attempt number of every backoff asked for (each pause is 0)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *answers: Any) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, float | None]] = []
        self.backoffs: list[int] = []
        self.key = (f"http://scripted-{uuid.uuid4().hex[:8]}:1/api", None)  # an endpoint of its own
        monkeypatch.setattr(_core, "exchange", self.exchange)
        monkeypatch.setattr(_retry, "backoff", self.backoff)

    async def exchange(
        self, ep: Endpoint, path: str, body: dict[str, Any], wait: float | None, remaining: float | None
    ) -> tuple[_wire.Answer, bool]:
        self.sent.append((path.rsplit("/", 1)[-1], wait))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers, body = answer
        return (status, HTTPStatus(status).phrase, headers, orjson.dumps(body)), False

    def backoff(self, attempt: int) -> float:
        self.backoffs.append(attempt)
        return 0.0

    def acquire(self, max_retries: int | None = None, timeout_seconds: float | None = None) -> Lease:
        spec = _core.Spec(["a"], 1, timeout_seconds, max_retries, 60.0, None, 0, False, self.key)
        rt = runtime()
        lease = rt.call(_core.acquire(rt, spec)).result()
        if lease._renewal is not None:  # a scripted grant: nothing to renew
            rt.loop.call_soon_threadsafe(lease._renewal.stop)
        return lease

    def take_rate(self) -> list[_core.GrantedLimit]:
        rt = runtime()
        return rt.call(_core.take_rate(rt, self.key, ["a"], 1, None)).result()

    def acquire_v1(self, timeout_seconds: float | None = None) -> _core.V1Grant:
        rt = runtime()
        return rt.call(_core.acquire_v1(rt, self.key, ["a"], "run", timeout_seconds)).result()


DOWN = ServerUnreachable("No answer from the server")
LOCKED = (423, {"retry-after": "0"}, {"detail": "Locked"})
BUSY = (503, {}, {"detail": "busy"})


def test_acquire_retries_in_a_row_what_is_not_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unreachable and 408/429/5xx count together, ATTEMPTS in a row at most; a 423 is an answer
    # (the count starts again), a 422 to a wait is not (it goes on).
    nothing = (200, {}, {"lease_id": "x", "limits": []})
    run = [DOWN, BUSY, DOWN, DOWN]
    script = Scripted(monkeypatch, *run, LOCKED, PREFECT_REFUSES_WAITS, *run, nothing)
    assert script.acquire().lease_id is None
    assert script.backoffs == [1, 2, 3, 4, 1, 2, 3, 4]
    waited = [wait for _, wait in script.sent]
    # Without max_retries every request waits on the server, the first too, until the server
    # says it does not wait (a Prefect server); then it polls, Prefect's way.
    assert waited == [_core.WAIT_CHUNK_SECONDS] * 6 + [None] * 5

    too_many = [DOWN, BUSY] * _retry.ATTEMPTS
    for last, detail in [(DOWN, "No answer from the server"), (BUSY, "503 Service Unavailable: busy")]:
        script = Scripted(monkeypatch, DOWN, BUSY, LOCKED, *too_many[: _retry.ATTEMPTS - 1], last)
        with pytest.raises(ConcurrencySlotAcquisitionError) as failed:
            script.acquire()
        assert str(failed.value) == f"Unable to acquire concurrency slots on ['a']: {detail}"
        assert failed.value.__cause__ is (DOWN if last is DOWN else None)
        assert script.answers == []
        assert script.backoffs == [1, 2, *range(1, _retry.ATTEMPTS)]


def test_acquire_counts_refusals_and_keeps_to_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # With max_retries the first request is Prefect's (a refusal at once, counted); then waits.
    script = Scripted(monkeypatch, LOCKED, DOWN, LOCKED)
    with pytest.raises(ConcurrencySlotAcquisitionError, match=r"^Unable .* \['a'\]: 423 Locked: Locked$"):
        script.acquire(max_retries=1)
    assert script.sent == [("increment-with-lease", None), *[("increment-with-lease", 55.0)] * 2]
    # Without, the first request waits: what is left of the timeout.
    script = Scripted(
        monkeypatch, (200, {}, {"lease_id": "x", "limits": [{"id": "i", "name": "a", "limit": 1}]})
    )
    assert script.acquire(timeout_seconds=PATIENCE).lease_id == "x"
    ((_, wait),) = script.sent
    assert wait is not None and 0 < wait <= PATIENCE
    with pytest.raises(AcquireConcurrencySlotTimeoutError, match=r"slots timed out after 0 second"):
        Scripted(monkeypatch, DOWN).acquire(timeout_seconds=0)


def test_a_server_shutting_down_is_waited_for_as_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # 503 with Retry-After (a server that is stopping, contract 2) is retried after the pause it
    # names, not a backoff; never past the caller's timeout.
    stopping = (503, {"retry-after": "0.01"}, {"detail": "Shutting down", "code": "shutting_down"})
    grant = (200, {}, {"lease_id": "x", "limits": [{"id": "i", "name": "a", "limit": 1}]})
    script = Scripted(monkeypatch, stopping, stopping, DOWN, grant)
    assert script.acquire(timeout_seconds=PATIENCE).lease_id == "x"
    assert script.backoffs == [3]  # the refused connection only
    with pytest.raises(AcquireConcurrencySlotTimeoutError):
        Scripted(monkeypatch, (503, {"retry-after": "30"}, {"code": "shutting_down"})).acquire(
            timeout_seconds=0.05
        )


def test_rate_limit_and_v1_retry_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Scripted(monkeypatch, DOWN, LOCKED, BUSY, DOWN, DOWN, DOWN, (200, {}, []))
    assert script.take_rate() == []
    assert script.backoffs == [1, 1, 2, 3, 4]
    grant = [{"id": "i", "name": "a", "limit": 1}]
    script = Scripted(monkeypatch, DOWN, LOCKED, BUSY, DOWN, DOWN, DOWN, (200, {}, grant))
    assert [lim.name for lim in script.acquire_v1().limits] == ["a"]
    assert script.backoffs == [1, 1, 2, 3, 4]

    for take, what in [(Scripted.take_rate, "slots on"), (Scripted.acquire_v1, "limits")]:
        with pytest.raises(ConcurrencySlotAcquisitionError) as failed:
            take(Scripted(monkeypatch, *[DOWN] * _retry.ATTEMPTS))
        assert str(failed.value) == f"Unable to acquire concurrency {what} ['a']: No answer from the server"
        # A 423 without Retry-After (a limit of 0) fails at once.
        with pytest.raises(ConcurrencySlotAcquisitionError) as failed:
            take(Scripted(monkeypatch, (423, {}, {"detail": "Locked"})))
        assert str(failed.value) == f"Unable to acquire concurrency {what} ['a']: 423 Locked: Locked"
    with pytest.raises(AcquireConcurrencySlotTimeoutError, match=r"limits timed out after 0\.5 second"):
        Scripted(monkeypatch, (423, {"retry-after": "1"}, {})).acquire_v1(timeout_seconds=0.5)


class FakeServer:
    """A scripted HTTP server: answers an acquisition that does not wait 423, holds a waiting one until
    the client half-closes, then answers it with a grant (the grant "on the wire" when the client
    gave up), and records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.server: asyncio.Server | None = None
        self.withdrawn = asyncio.Event()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
                body = orjson.loads(await reader.readexactly(length))
                self.requests.append((path, body))
                if path.endswith("/increment-with-lease") and "wait_seconds" not in body:
                    self.reply(writer, 423, {"detail": "Locked"}, {"Retry-After": "1.0"})
                elif path.endswith("/increment-with-lease"):
                    assert await reader.read() == b""  # the client half-closed: it gave up
                    self.withdrawn.set()
                    grant = {"lease_id": "raced", "limits": [{"id": "i", "name": "db", "limit": 1}]}
                    self.reply(writer, 200, grant)
                    await writer.drain()
                    break
                else:
                    self.reply(writer, 204, None)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def reply(
        writer: asyncio.StreamWriter, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        payload = b"" if body is None else orjson.dumps(body)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload
        )


async def test_a_grant_on_the_wire_when_the_caller_gives_up_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLOTKEEPER_SDK_PROTOCOL", "http")  # the half-close of HTTP's withdrawal
    fake = FakeServer()
    async with fake as url:
        waiter = asyncio.create_task(aconcurrency("db", api_url=url).__aenter__())
        await auntil(
            lambda: any("wait_seconds" in body for _, body in fake.requests), "the waiting request sent"
        )
        sent = len(fake.requests)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await auntil(lambda: len(fake.requests) == sent + 1, "the raced grant released")
    assert fake.withdrawn.is_set()
    assert fake.requests[-1] == ("/api/v2/concurrency_limits/decrement-with-lease", {"lease_id": "raced"})


# --- the wire: an answer that arrives with a cancellation ----------------------------------------


class _Transport(asyncio.Transport):
    """A transport that records what the connection writes (it never sends anything)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.eof_written = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        pass


GRANT = b'HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{"lease_id":1}\n'


@pytest.mark.parametrize("withdraw", [False, True])
async def test_an_answer_that_completes_as_the_request_is_cancelled_is_kept(withdraw: bool) -> None:
    """The answer completes and the task is cancelled in the same loop step: the task never sees
    the answer's future again, and the answer is already out of the buffer. It must still come
    back from ``exchange`` (a grant the caller then releases), not be lost with the connection."""
    conn = _wire.Connection()
    conn.connection_made(_Transport())
    task = asyncio.ensure_future(conn.exchange(b"POST / HTTP/1.1\r\n\r\n", 10.0, withdraw=withdraw))
    await asyncio.sleep(0)  # sent; waiting for the answer
    conn.data_received(GRANT)
    task.cancel()
    conn.connection_lost(None)  # and the server closes, as after a withdrawal
    status, _, _, body = await task
    assert (status, body) == (200, b'{"lease_id":1}\n')
