"""Group commit for a backend whose transactions run on threads (PostgreSQL).

Operations are queued on the event loop. Each free *lane* (at most ``lanes`` at once, each one
transaction on one pool connection) takes its share of what is queued (spread evenly over the
free lanes, at most ``max_size``) and runs it as one group in one transaction (``run_group``, on
a pool thread). While groups are out, newcomers queue for the next free lane: under load, groups
grow and the cost of a transaction (its commit, its fsync) is shared; with one request in the
air, a group is that request alone and costs what a transaction of its own costs. Spreading
matters: a group's operations take their round trips one after the other, so one group of 64
answers later than eight groups of 8 side by side.

What a group guarantees (``PostgresBackend._run_group``): an operation that fails does not fail
the others; every decision is still made under the row locks it takes, in the database; nothing
is reported before the commit, and a hand-off to a waiting request of this process runs only
once its group has committed. This module only queues, hands groups to the runner, and completes
the callers' futures in the order they queued. An operation may come in two halves
(:class:`TwoHalves`: its locks and reads, then its decision and writes), so that the runner can
send the first halves of a whole group together.

An operation is handed over for good once queued (``Backend.run``'s contract): if its caller is
cancelled meanwhile it still runs, and its outcome is dropped (``waiting.Acquisitions`` gives
back what a cancelled acquisition was granted).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, Protocol, TypeVar

from slotkeeper.errors import StorageClosed
from slotkeeper.storage.tx import Tx

T = TypeVar("T")
R = TypeVar("R", bound="SentReads")


class SentReads(Protocol):
    """What the first half of a :class:`TwoHalves` operation sent: its locks and reads."""

    def locked_ids(self) -> set[str]:
        """The limits they lock (waits for their rows)."""
        ...

    def admits(self) -> bool:
        """Whether the second half may lock or change limits other than those (admission)."""
        ...

    def refresh(self, tx: Tx) -> None:
        """Send the reads again, behind every statement sent so far."""
        ...


class TwoHalves(Generic[R, T]):
    """An operation in two halves: ``send`` sends its locks and reads and waits for nothing;
    ``finish`` waits for their rows, decides and writes. Called whole it is a plain transaction
    script (SQLite, an operation alone). A PostgreSQL group sends the first halves of several
    such operations before it finishes any, so that they share one round trip
    (``postgres._attempt_group``). ``send`` returns None where statements cost no round trip
    (SQLite: ``Scripts.one_writer``): ``finish`` then reads what it needs itself."""

    __slots__ = ("finish", "send")

    def __init__(self, send: Callable[[Tx], R | None], finish: Callable[[Tx, R | None], T]) -> None:
        self.send = send
        self.finish = finish

    def __call__(self, tx: Tx) -> T:
        return self.finish(tx, self.send(tx))


#: One operation: a transaction script.
Op = Callable[[Tx], Any]
#: What became of one operation: (True, its result) or (False, the exception it raised).
Outcome = tuple[bool, Any]
#: Runs a group (on a pool thread) and returns one outcome per operation, in order.
GroupRunner = Callable[[list[Op]], list[Outcome]]


class GroupQueue:
    """The operations waiting for a lane, and the lanes' groups in flight."""

    def __init__(self, run_group: GroupRunner, executor: Executor, *, lanes: int, max_size: int) -> None:
        if lanes < 1 or max_size < 1:
            raise ValueError("a group queue needs at least one lane and groups of one operation")
        self._run_group = run_group
        self._executor = executor
        self.lanes = lanes
        self.max_size = max_size
        self._pending: deque[tuple[Op, asyncio.Future[Any]]] = deque()
        self._free = lanes
        self._scheduled = False
        self._closed = False
        #: Told the size of every group it hands to a lane (metrics), when set.
        self.on_group: Callable[[int], None] | None = None

    @property
    def queued(self) -> int:
        """Operations waiting for a lane."""
        return len(self._pending)

    @property
    def busy(self) -> int:
        """Lanes running a group now."""
        return self.lanes - self._free

    async def run(self, op: Callable[[Tx], T]) -> T:
        """Queue ``op`` for the next group; its result once that group has committed."""
        if self._closed:
            raise StorageClosed("storage is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((op, future))
        if self._free and not self._scheduled:
            # Not at once: what else arrives in this turn of the loop joins the same group.
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    async def close(self) -> None:
        """Refuse new operations; return once every queued one has run."""
        self._closed = True
        while self._pending or self._free < self.lanes:
            await asyncio.sleep(0.001)

    def _dispatch(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and self._free:
            # Spread over the free lanes: groups in flight side by side answer sooner than one
            # large group, whose operations take their round trips one after the other.
            count = min(-(-len(self._pending) // self._free), self.max_size)
            group = [self._pending.popleft() for _ in range(count)]
            self._free -= 1
            if self.on_group is not None:
                self.on_group(count)
            done = loop.run_in_executor(self._executor, self._run_group, [op for op, _ in group])
            done.add_done_callback(lambda d, g=group: self._finished(g, d))  # type: ignore[misc]

    def _finished(
        self, group: list[tuple[Op, asyncio.Future[Any]]], done: asyncio.Future[list[Outcome]]
    ) -> None:
        self._free += 1
        if self._pending and not self._scheduled:
            self._dispatch()  # the next group leaves before this one's callers are answered
        error = done.exception()
        outcomes: list[Outcome] = [(False, error)] * len(group) if error is not None else done.result()
        for (_, future), (ok, value) in zip(group, outcomes, strict=True):
            if future.done():  # cancelled: the operation ran all the same
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
