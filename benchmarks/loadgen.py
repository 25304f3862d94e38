"""The load generator: aiohttp clients in separate worker processes.

One :class:`WorkerPool` keeps ``procs`` worker processes alive for the whole run. For each
measurement the parent hands every worker a :class:`Job` (its share of the clients); a worker
opens one aiohttp session with exactly one keep-alive connection per client, primes every
connection with one ``GET /api/health``, reports ready, and waits for the common start time.
Then every client loops over its operation until the window ends and the worker sends back raw
numbers (:class:`WorkerResult`); the parent merges them (:func:`merge`).

Timeline of one measurement (times are wall-clock, shared by all processes)::

    start ── warm-up ──> window_start ── measured window ──> window_end ─ grace ─> stop

Only what happens inside the window counts: a pair (or a health request) counts when its last
response arrives inside the window; an acquire latency counts when the acquire was sent inside
the window and succeeded; an error counts when its response (or failure) arrives inside it.
Requests still in flight ``grace`` seconds after the window are cancelled and counted as
``unfinished``. Every client loop is bounded in time (the window) and in count (``max_ops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

Kind = Literal["pairs", "health"]

ACQUIRE = "/api/v2/concurrency_limits/increment-with-lease"
RELEASE = "/api/v2/concurrency_limits/decrement-with-lease"
HEALTH = "/api/health"
JSON_HEADERS = {"Content-Type": "application/json"}
#: Lease length asked for by every acquire: long enough that no lease expires during a run.
LEASE_SECONDS = 300


@dataclass(frozen=True)
class Job:
    """One worker's share of one measurement."""

    kind: Kind
    base_url: str
    #: Client numbers; in ``pairs`` client ``i`` uses the limit ``bench-i``.
    clients: tuple[int, ...]
    warmup: float
    duration: float
    #: Seconds past the window's end before in-flight requests are cancelled.
    grace: float
    #: Per-request timeout (connect + response) in seconds.
    request_timeout: float
    #: Upper bound on operations per client (the time bound normally ends the loop first).
    max_ops: int


@dataclass
class WorkerResult:
    """Raw numbers from one worker for one measurement."""

    #: Pairs (``pairs``) or requests (``health``) completed inside the window.
    completed: int = 0
    #: Acquire (or health request) latencies in seconds, packed ``array('d')`` bytes.
    latencies: bytes = b""
    #: Release latencies in seconds (``pairs`` only), packed ``array('d')`` bytes.
    release_latencies: bytes = b""
    #: Errors inside the window by ``"<acquire|release|health>:<status or kind>"``.
    errors: dict[str, int] = field(default_factory=dict)
    #: Clients whose request was still in flight when the worker stopped.
    unfinished: int = 0
    #: Problems outside the window (priming), for the log only.
    notes: list[str] = field(default_factory=list)


@dataclass
class Merged:
    """The results of all workers of one measurement, merged."""

    completed: int
    latencies: list[float]
    release_latencies: list[float]
    errors: dict[str, int]
    unfinished: int
    notes: list[str]


def merge(results: list[WorkerResult]) -> Merged:
    """Merge worker results: sum the counts, concatenate the latencies."""
    latencies: array[float] = array("d")
    releases: array[float] = array("d")
    errors: Counter[str] = Counter()
    for r in results:
        latencies.frombytes(r.latencies)
        releases.frombytes(r.release_latencies)
        errors.update(r.errors)
    return Merged(
        completed=sum(r.completed for r in results),
        latencies=latencies.tolist(),
        release_latencies=releases.tolist(),
        errors=dict(sorted(errors.items())),
        unfinished=sum(r.unfinished for r in results),
        notes=[n for r in results for n in r.notes],
    )


# --- the worker side ----------------------------------------------------------------------------


@dataclass
class _Window:
    """The measured window, in this process's ``perf_counter`` time."""

    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end


class _Tally:
    """What the clients of one worker count."""

    def __init__(self) -> None:
        self.completed = 0
        self.latencies: array[float] = array("d")
        self.release_latencies: array[float] = array("d")
        self.errors: Counter[str] = Counter()


def _failure_kind(exc: BaseException) -> str:
    """``timeout``, or ``connection(<exception class>)``: e.g. a server that closes the
    connection after answering (Prefect does after each 503) shows as ServerDisconnectedError."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return f"connection({type(exc).__name__})"


async def _pairs_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """Acquire-with-lease then release, on this client's own limit, until the window ends."""
    acquire_url, release_url = base + ACQUIRE, base + RELEASE
    body = json.dumps({"names": [f"bench-{client}"], "slots": 1, "lease_duration": LEASE_SECONDS}).encode()
    clock = time.perf_counter
    for _ in range(job.max_ops):
        t0 = clock()
        if t0 >= window.end:
            return
        lease_id: str | None = None
        try:
            async with session.post(acquire_url, data=body, headers=JSON_HEADERS) as resp:
                status = resp.status
                payload = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            t1 = clock()
            if t1 in window:
                tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)  # a refused connection must not become a busy loop
            continue
        t1 = clock()
        if status == 200:
            lease_id = json.loads(payload)["lease_id"]
            if t0 in window:
                tally.latencies.append(t1 - t0)
        else:
            if t1 in window:
                tally.errors[f"acquire:{status}"] += 1
            continue
        try:
            async with session.post(
                release_url, data=json.dumps({"lease_id": lease_id}).encode(), headers=JSON_HEADERS
            ) as resp:
                status = resp.status
                await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            t2 = clock()
            if t2 in window:
                tally.errors[f"release:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t2 = clock()
        if t2 in window:
            if status == 204:
                tally.completed += 1
                tally.release_latencies.append(t2 - t1)
            else:
                tally.errors[f"release:{status}"] += 1


async def _health_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """``GET /api/health`` in a loop until the window ends: the generator's no-op ceiling."""
    url = base + HEALTH
    clock = time.perf_counter
    for _ in range(job.max_ops):
        t0 = clock()
        if t0 >= window.end:
            return
        try:
            async with session.get(url) as resp:
                status = resp.status
                await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if clock() in window:
                tally.errors[f"health:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t1 = clock()
        if t1 in window:
            if status == 200:
                tally.completed += 1
            else:
                tally.errors[f"health:{status}"] += 1
        if status == 200 and t0 in window:
            tally.latencies.append(t1 - t0)


_CLIENTS: dict[Kind, Callable[..., Coroutine[Any, Any, None]]] = {
    "pairs": _pairs_client,
    "health": _health_client,
}


async def _open_sessions(job: Job) -> tuple[list[aiohttp.ClientSession], list[str]]:
    """One session per client, each with a single keep-alive connection, primed by a request."""
    timeout = aiohttp.ClientTimeout(total=job.request_timeout)
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False, ttl_dns_cache=None),
            timeout=timeout,
        )
        for _ in job.clients
    ]

    async def prime(session: aiohttp.ClientSession) -> str | None:
        try:
            async with session.get(job.base_url + HEALTH) as resp:
                await resp.read()
                return None if resp.status == 200 else f"priming answered {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"priming failed: {exc!r}"

    notes = [n for n in await asyncio.gather(*(prime(s) for s in sessions)) if n]
    return sessions, sorted(set(notes))


async def _run(job: Job, conn: multiprocessing.connection.Connection) -> WorkerResult:
    """Run one job: open and prime, report ready, wait for the start time, load, collect."""
    sessions, notes = await _open_sessions(job)
    try:
        conn.send(("ready", None))
        loop = asyncio.get_running_loop()
        # The parent answers with the common start time (wall clock), or None to abort.
        start_wall = await loop.run_in_executor(None, conn.recv)
        if start_wall is None:
            return WorkerResult(notes=notes)
        delay = start_wall - time.time()
        start = time.perf_counter() + delay
        window = _Window(start + job.warmup, start + job.warmup + job.duration)
        if delay > 0:
            await asyncio.sleep(delay)
        tally = _Tally()
        client = _CLIENTS[job.kind]
        tasks = [
            asyncio.create_task(client(s, job.base_url, c, job, window, tally))
            for s, c in zip(sessions, job.clients, strict=True)
        ]
        stop_in = max(0.0, window.end + job.grace - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=stop_in) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                notes.append(f"client crashed: {task.exception()!r}")
        return WorkerResult(
            completed=tally.completed,
            latencies=tally.latencies.tobytes(),
            release_latencies=tally.release_latencies.tobytes(),
            errors=dict(tally.errors),
            unfinished=len(pending),
            notes=notes,
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(s.close() for s in sessions)), timeout=5)


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: run jobs until told to stop (``None``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        try:
            result = loop.run_until_complete(_run(job, conn))
        except Exception as exc:  # reported to the parent, which fails the run
            conn.send(("error", repr(exc)))
        else:
            conn.send(("result", result))
    loop.close()


# --- the parent side ----------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker failed or did not answer in time."""


class WorkerPool:
    """``procs`` load-generator processes, reused for every measurement."""

    def __init__(self, procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), name=f"loadgen-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(proc)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (for CPU accounting)."""
        return [p.pid for p in self.processes if p.pid is not None]

    def _recv(self, conn: multiprocessing.connection.Connection, deadline: float, want: str) -> object:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not conn.poll(remaining):
            raise WorkerError(f"a load-generator worker did not send {want!r} in time")
        tag, value = conn.recv()
        if tag == "error":
            raise WorkerError(f"a load-generator worker failed: {value}")
        if tag != want:
            raise WorkerError(f"a load-generator worker sent {tag!r}, expected {want!r}")
        return value

    def prepare(self, jobs: list[Job], timeout: float) -> None:
        """Send each worker its job and wait until all have primed their connections."""
        if len(jobs) != len(self._conns):
            raise ValueError("one job per worker")
        for conn, job in zip(self._conns, jobs, strict=True):
            conn.send(job)
        deadline = time.monotonic() + timeout
        for conn in self._conns:
            self._recv(conn, deadline, "ready")

    def start(self, start_wall: float) -> None:
        """Tell every prepared worker the common start time (``time.time()`` based)."""
        for conn in self._conns:
            conn.send(start_wall)

    def collect(self, timeout: float) -> list[WorkerResult]:
        """The results of the running measurement, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        results = []
        for conn in self._conns:
            value = self._recv(conn, deadline, "result")
            assert isinstance(value, WorkerResult)
            results.append(value)
        return results

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        for proc in self.processes:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for conn in self._conns:
            conn.close()


def split_clients(clients: int, procs: int) -> list[tuple[int, ...]]:
    """Deal ``clients`` client numbers round-robin over ``procs`` workers (1 client: one worker)."""
    shares: list[list[int]] = [[] for _ in range(procs)]
    for c in range(clients):
        shares[c % procs].append(c)
    return [tuple(s) for s in shares]
