"""Background loops that never die silently: restarted with backoff, logged, reported to readiness.

A server runs a few loops beside its requests: the reaper and the event retention job (tasks on
the event loop), PostgreSQL's event listener and SQLite's checkpointer (threads). Any of them
used to be able to stop for good on one unexpected error: on PostgreSQL one event dated before
year 1000 killed the listener thread, and with it every live event and every wake-up of waiters
between processes, with a single traceback in the log (issue 11, defect 12).

A :class:`Supervisor` runs such a loop (:meth:`Supervisor.keep` for a coroutine,
:meth:`Supervisor.keep_thread` for a thread's body): when it raises, or returns when it should
not, the failure is logged with its traceback and the loop starts again after a delay that
doubles with each failure still in the window (``FIRST_DELAY`` up to ``MAX_DELAY``). A loop may
also report a failed pass of its own without dying (:meth:`Supervisor.failure`, the reaper's
database errors). A loop with ``max_failures`` failures within ``window`` seconds is
:meth:`~Supervisor.problems`: ``GET /api/ready`` answers 503 while any is, so an orchestrator
stops routing to the process (and may restart it) instead of it limping on unnoticed; it is
ready again once the failures leave the window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger("slotkeeper.supervisor")

__all__ = ["FIRST_DELAY", "MAX_DELAY", "Supervisor"]

#: Delay before the first restart, doubled by each further failure in the window.
FIRST_DELAY = 0.1
#: The longest delay between two restarts.
MAX_DELAY = 30.0


class LoopEnded(RuntimeError):
    """A supervised loop returned, which it never should while the server runs."""


class Supervisor:
    """Keeps background loops running and remembers their recent failures (thread-safe)."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        *,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(name, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def failure(self, name: str, exc: BaseException) -> float:
        """Record that loop ``name`` failed with ``exc`` (logged with its traceback); return how
        long to wait before it goes again."""
        now = self.clock()
        with self._lock:
            failures = self._recent(name, now)
            failures.append(now)
            count = len(failures)
        delay = min(self.first_delay * 2.0 ** (count - 1), self.max_delay)
        log.error(
            "background loop %r failed (%d time(s) in the last %g s); it goes again in %.1f s",
            name,
            count,
            self.window,
            delay,
            exc_info=exc,
            extra={"loop": name, "failures": count},
        )
        return delay

    def problems(self) -> dict[str, int]:
        """Every loop that failed at least ``max_failures`` times within the window: how often."""
        now = self.clock()
        with self._lock:
            counts = {name: len(self._recent(name, now)) for name in list(self._failures)}
        return {name: count for name, count in counts.items() if count >= self.max_failures}

    async def keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run the coroutine ``run()`` makes, again after each failure, until cancelled."""
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.failure(name, exc)
            else:
                delay = self.failure(name, LoopEnded(f"{name} returned"))
            await asyncio.sleep(delay)

    def keep_thread(self, name: str, run: Callable[[], None], stop: threading.Event) -> None:
        """A thread's body: call ``run()``, again after each failure, until ``stop`` is set
        (``run`` returns once it sees ``stop``)."""
        while not stop.is_set():
            try:
                run()
            except Exception as exc:
                delay = self.failure(name, exc)
            else:
                if stop.is_set():
                    return
                delay = self.failure(name, LoopEnded(f"{name} returned"))
            stop.wait(delay)
