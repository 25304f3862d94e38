"""The supervisor of background loops: restarts with backoff, failures counted in a window, and
what readiness sees (``slotkeeper.supervisor``). A fake clock drives the window; delays are
returned, never slept on, except where a loop really restarts (then they are zero)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from slotkeeper.supervisor import Supervisor
from tests.conftest import FakeClock

BOUND = 30.0  # seconds: a bound on a broken supervisor, never an expectation


def test_the_delay_doubles_with_each_failure_in_the_window_up_to_the_cap() -> None:
    clock = FakeClock(0.0)
    supervisor = Supervisor(max_failures=100, window=60.0, first_delay=0.1, max_delay=1.0, clock=clock)
    delays = [supervisor.failure("x", RuntimeError("boom")) for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    clock.advance(61)  # the failures left the window: back to the first delay
    assert supervisor.failure("x", RuntimeError("boom")) == 0.1


def test_a_loop_is_a_problem_at_max_failures_within_the_window_only() -> None:
    clock = FakeClock(0.0)
    supervisor = Supervisor(max_failures=3, window=10.0, clock=clock)
    for _ in range(2):
        supervisor.failure("reaper", RuntimeError("db"))
    supervisor.failure("retention", RuntimeError("db"))
    assert supervisor.problems() == {}
    clock.advance(5)
    supervisor.failure("reaper", RuntimeError("db"))
    assert supervisor.problems() == {"reaper": 3}
    clock.advance(5)  # the first two are 10 s old: out of the window
    assert supervisor.problems() == {}


def test_a_failure_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor()
    with caplog.at_level(logging.ERROR, logger="slotkeeper.supervisor"):
        try:
            raise ValueError("Invalid isoformat string")
        except ValueError as exc:
            supervisor.failure("event listener", exc)
    (entry,) = caplog.records
    assert "'event listener' failed (1 time(s)" in entry.getMessage()
    assert entry.exc_info is not None and entry.exc_info[0] is ValueError


async def test_a_coroutine_that_dies_is_started_again() -> None:
    supervisor = Supervisor(max_failures=2, first_delay=0.0)
    runs: list[int] = []
    again = asyncio.Event()

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RuntimeError(f"crash {len(runs)}")
        again.set()
        await asyncio.Event().wait()  # runs until cancelled

    task = asyncio.ensure_future(supervisor.keep("loop", loop))
    await asyncio.wait_for(again.wait(), BOUND)
    assert runs == [0, 1, 2]
    assert supervisor.problems() == {"loop": 2}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_coroutine_that_returns_counts_as_a_failure() -> None:
    supervisor = Supervisor(max_failures=1, first_delay=0.0)
    returned = asyncio.Event()

    async def loop() -> None:
        if returned.is_set():
            await asyncio.Event().wait()
        returned.set()

    task = asyncio.ensure_future(supervisor.keep("loop", loop))
    await asyncio.wait_for(returned.wait(), BOUND)
    for _ in range(100):  # until the supervisor has counted it (a few turns of the loop)
        if supervisor.problems():
            break
        await asyncio.sleep(0)
    assert supervisor.problems() == {"loop": 1}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_thread_body_that_dies_is_called_again_until_stopped() -> None:
    supervisor = Supervisor(first_delay=0.0)
    stop = threading.Event()
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("a bad payload")
        stop.set()  # the third run sees the stop and returns, as a listener does

    supervisor.keep_thread("listener", body, stop)  # returns: it runs on this thread
    assert len(calls) == 3
    assert supervisor.problems() == {}  # 2 failures, fewer than the default 5
