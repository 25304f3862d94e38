"""The scenarios beyond "pairs": contended hand-off, Prefect's own client, rate limits, events.

Each scenario is measured on each server in turn, round after round, exactly as "pairs" (the
turn order rotates every round; servers not being measured are frozen with SIGSTOP). A
measurement resumes its server, creates what it needs (fresh limits, so no round inherits the
previous one's state), runs the load through the load-generator processes (or Prefect's client
in ``.venv-prefect``), lets the server settle and freezes it again. The parent keeps raw records
and reduces them here to the figures of one measurement (a JSON-ready dict); ``report_scenarios``
turns a list of those into tables across rounds. The scale scenario is in ``scale.py``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import itertools
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import report
import servers
from servers import Server

if TYPE_CHECKING:
    from loadgen import Job, Merged, WorkerPool

#: Every scenario (the order of ``--scenarios`` and of the report; ``plan.py`` sets the run order).
SCENARIOS = ("pairs", "handoff", "sdk", "client", "rate", "events", "scale", "procs")

ACQUIRED = "prefect.concurrency-limit.acquired"
RELEASED = "prefect.concurrency-limit.released"
HOLDER_PREFIX = "prefect.task-run."
#: The hand-off's machine floor: its variant, and the target its measurements are reported under
#: (``benchmarks/floor.py``, an in-memory lock over raw TCP; no server of the comparison).
FLOOR = "floor"
#: The durable floor: ``floor.py --fsync``, every grant made durable (``fdatasync``) before it is
#: answered; the bound for a server that syncs each commit (PostgreSQL's default).
FLOOR_DURABLE = "floor-fsync"
FLOORS = (FLOOR, FLOOR_DURABLE)
FLOOR_SCRIPT = Path(__file__).with_name("floor.py")


@dataclass(frozen=True)
class Extra:
    """How long and how much the scenarios beyond "pairs" measure (per mode)."""

    # contended hand-off
    handoff_workers: int = 8
    handoff_hold: float = 0.010
    handoff_warmup: float = 0.25
    handoff_duration: float = 1.0
    #: Variants measured on slotkeeper on SQLite ("wait": raw requests with ``wait_seconds``,
    #: slotkeeper's server-side queue; "sdk": slotkeeper's SDK, which waits there too; "poll":
    #: Prefect's protocol), and on PostgreSQL. Prefect's server is measured polling.
    handoff_sqlite: tuple[str, ...] = ("wait", "sdk", "poll")
    handoff_postgres: tuple[str, ...] = ("wait",)
    #: Also measure the machine's floor every round: the same load against ``floor.py``, a
    #: minimal in-memory lock over raw TCP (no HTTP, no database), in a process of its own.
    handoff_floor: bool = True
    #: And the durable floor (``floor.py --fsync``) when PostgreSQL is measured.
    handoff_floor_durable: bool = False
    # slotkeeper's SDK against the Redis semaphore (benchmarks/sdk_vs_redis.py): blocks per second
    # of one process with this many holders, each on a limit (or key) of its own
    sdk_holders: int = 64
    sdk_warmup: float = 0.5
    sdk_duration: float = 2.0
    # Prefect's concurrency() client
    client_rounds: int = 1
    client_tasks: int = 16
    client_blocks: int = 5
    client_hold: float = 0.010
    client_limits: tuple[int, ...] = (1, 4)
    #: A run still going after this many seconds is cut off (and reported as such).
    client_timeout: float = 2.0
    # rate limit
    rate_rounds: int = 1
    rate_clients: int = 4
    rate_duration: float = 2.5
    rate_limit: int = 10
    rate_decay: float = 10.0
    # event delivery
    events_clients: int = 16
    events_rate: float = 500.0
    events_warmup: float = 0.25
    events_duration: float = 1.0
    # scale (slotkeeper only)
    scale_limits: int = 1_000
    scale_leases: int = 10_000
    scale_short_leases: int = 200
    scale_short_duration: float = 1.5
    scale_clients: int = 16
    scale_warmup: float = 0.25
    scale_duration: float = 1.0
    # procs: one and two slotkeeper processes on one PostgreSQL database (procs.py)
    procs_warmup: float = 1.0
    procs_duration: float = 2.0


EXTRA = {
    "short": Extra(),
    "full": Extra(
        handoff_warmup=2.0,
        handoff_duration=10.0,
        handoff_postgres=("wait", "sdk", "poll"),
        handoff_floor_durable=True,
        sdk_warmup=1.0,
        sdk_duration=5.0,
        client_rounds=2,
        client_timeout=30.0,
        rate_rounds=3,
        rate_duration=10.0,
        events_warmup=2.0,
        events_duration=10.0,
        scale_limits=10_000,
        scale_leases=100_000,
        scale_short_leases=1_000,
        scale_short_duration=3.0,
        scale_warmup=2.0,
        scale_duration=10.0,
        procs_warmup=2.0,
        procs_duration=10.0,
    ),
}


@dataclass
class Context:
    """What every scenario needs: the servers, the load generator, the timing of the mode."""

    pool: WorkerPool
    servers: dict[str, Server]
    extra: Extra
    pause: bool
    settle_max: float
    began: float
    #: Servers started but not yet healthy (Prefect's boots slowly): they go on booting while
    #: nothing is measured and are frozen while something is (see :meth:`quiet`).
    booting: list[Server] = field(default_factory=list)

    def log(self, text: str) -> None:
        """A progress line."""
        print(f"[bench {time.monotonic() - self.began:5.0f}s] {text}", flush=True)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """The servers still booting frozen for a measurement, as idle servers are."""
        frozen = self.booting if self.pause else []
        for server in frozen:
            server.pause()
        try:
            yield
        finally:
            for server in frozen:
                server.resume()


# --- small helpers ------------------------------------------------------------------------------


def request_json(
    method: str, url: str, body: Any = None, timeout: float = 30.0
) -> tuple[int, Any, dict[str, str]]:
    """One HTTP request with a JSON body; (status, decoded answer or None, headers)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, headers = resp.read(), int(resp.status), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), int(exc.code), dict(exc.headers)
    try:
        return status, json.loads(raw) if raw else None, headers
    except ValueError:
        return status, None, headers


def create_limit(server: servers.Server, name: str, limit: int, **extra: Any) -> None:
    """Create a limit (bounded retries: Prefect may answer 503 under its own background load)."""
    status = 0
    for _ in range(10):
        status, _, _ = request_json(
            "POST", server.base_url + "/api/v2/concurrency_limits/", {"name": name, "limit": limit, **extra}
        )
        if status in (200, 201, 409):
            return
        time.sleep(0.3)
    raise servers.ServerError(f"{server.key}: creating limit {name} answered {status}")


def pct(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """count, p50/p90/p99/max of ``values`` times ``scale`` (seconds to ms by default)."""
    ordered = sorted(v * scale for v in values)
    return {
        "count": len(ordered),
        "p50": report.percentile(ordered, 50),
        "p90": report.percentile(ordered, 90),
        "p99": report.percentile(ordered, 99),
        "max": ordered[-1] if ordered else None,
    }


def quantiles(values: Sequence[float], scale: float = 1000.0) -> list[float]:
    """The 0th, 1st, ..., 100th percentiles (nearest rank), for plots (empty if no values)."""
    ordered = sorted(v * scale for v in values)
    if not ordered:
        return []
    return [round(report.percentile(ordered, q) or ordered[0], 3) for q in range(101)]


def jain(counts: Sequence[int]) -> float | None:
    """Jain's fairness index: 1 when every worker got the same, 1/n when one got everything."""
    total, squares = sum(counts), sum(c * c for c in counts)
    return (total * total) / (len(counts) * squares) if squares else None


@contextlib.contextmanager
def active(ctx: Context, server: servers.Server) -> Iterator[None]:
    """The server unfrozen and healthy for one measurement; settled and frozen again after."""
    server.resume()
    try:
        if not servers.healthy(server, timeout=5):
            servers.wait_healthy([server], timeout=30)
        yield
        settle(server, ctx.settle_max)
    finally:
        if ctx.pause:
            server.pause()


def settle(server: servers.Server, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the server uses under 0.15 core; the seconds waited."""
    began = time.monotonic()
    pids = server.pids()
    while time.monotonic() - began < max_wait:
        c0, t0 = servers.cpu_seconds(pids), time.monotonic()
        time.sleep(0.1)
        if (servers.cpu_seconds(pids) - c0) / (time.monotonic() - t0) < 0.15:
            break
    return time.monotonic() - began


@dataclass
class Window:
    """What one load-generator run gives back: merged results, its window (wall clock), CPU."""

    merged: Merged
    start: float
    end: float
    cpu: dict[str, float]


def run_jobs(ctx: Context, server: servers.Server, jobs: list[Job], warmup: float, duration: float) -> Window:
    """Run one job per load-generator worker against ``server``; CPU is taken over the window."""
    from loadgen import merge

    ctx.pool.prepare(jobs, timeout=60)
    server_pids, loadgen_pids = server.pids(), ctx.pool.pids
    start = time.time() + 0.05
    ctx.pool.start(start)
    _sleep_until(start + warmup)
    s0 = (time.monotonic(), servers.cpu_seconds(server_pids), servers.cpu_seconds(loadgen_pids))
    m0 = servers.machine_cpu()
    _sleep_until(start + warmup + duration)
    s1 = (time.monotonic(), servers.cpu_seconds(server_pids), servers.cpu_seconds(loadgen_pids))
    m1 = servers.machine_cpu()
    grace = max(j.grace for j in jobs)
    results = ctx.pool.collect(timeout=grace + 60)
    wall = max(1e-9, s1[0] - s0[0])
    server_cores, loadgen_cores = (s1[1] - s0[1]) / wall, (s1[2] - s0[2]) / wall
    busy = (m1[0] - m0[0]) / wall
    cpu = {
        "server_cores": server_cores,
        "loadgen_cores": loadgen_cores,
        "machine_busy_cores": busy,
        "other_cores": max(0.0, busy - server_cores - loadgen_cores),
        "steal_cores": (m1[1] - m0[1]) / wall,
    }
    return Window(merge(results), start + warmup, start + warmup + duration, cpu)


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def _job(
    kind: str,
    server: servers.Server,
    clients: tuple[int, ...],
    warmup: float,
    duration: float,
    grace: float,
    params: dict[str, Any],
) -> Job:
    from loadgen import Job

    return Job(
        kind=kind,  # type: ignore[arg-type]
        base_url=server.base_url,
        clients=clients,
        warmup=warmup,
        duration=duration,
        grace=grace,
        request_timeout=warmup + duration + grace + 60.0,
        max_ops=int((warmup + duration + grace + 1) * 100_000),
        params=params,
    )


def spread_jobs(
    kind: str,
    ctx: Context,
    server: servers.Server,
    clients: int,
    warmup: float,
    duration: float,
    grace: float,
    params: dict[str, Any],
) -> list[Job]:
    """One job per worker, the clients dealt round-robin."""
    from loadgen import split_clients

    return [
        _job(kind, server, share, warmup, duration, grace, params)
        for share in split_clients(clients, len(ctx.pool.pids))
    ]


def _base(scenario: str, server: servers.Server, variant: str, rnd: int) -> dict[str, Any]:
    return {"scenario": scenario, "target": server.key, "variant": variant, "round": rnd}


# --- the live event stream (a thread of the parent process) --------------------------------------


@dataclass
class Arrival:
    """One event as a subscriber received it."""

    arrived: float
    event: str
    key: str | None
    occurred: float
    received: float | None


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Subscriber:
    """A websocket subscriber on ``/api/events/out`` with Prefect's handshake, in its own thread.

    It records, for every event, its arrival time (wall clock), name, occurred and received, and
    the id of its ``prefect.task-run.<id>`` related resource (the key the load put in the
    holder). Frames are parsed as they come; nothing else runs on that thread.
    """

    def __init__(self, base_url: str, names: Sequence[str] | None = None) -> None:
        self.url = base_url.replace("http://", "ws://", 1) + "/api/events/out"
        now = dt.datetime.now(dt.UTC)
        event_filter: dict[str, Any] = {
            "event": {"prefix": ["prefect.concurrency-limit."]},
            # An explicit future ``until``: Prefect's server would otherwise end the live stream
            # at the time the filter was parsed (its own subscriber sends now + 365 days).
            "occurred": {
                "since": (now - dt.timedelta(minutes=1)).isoformat(),
                "until": (now + dt.timedelta(days=1)).isoformat(),
            },
        }
        if names:
            event_filter["event"] = {"name": list(names)}
        self.filter = event_filter
        self.arrivals: list[Arrival] = []
        self.error: str | None = None
        self.frames = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name="bench-subscriber", daemon=True)

    def start(self, timeout: float = 15.0) -> str | None:
        """Connect and subscribe; None when subscribed, else why not."""
        self._thread.start()
        if not self._ready.wait(timeout):
            return f"no subscription after {timeout:g} s"
        return self.error

    def stop(self) -> None:
        """Close the socket and end the thread (bounded)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout=10)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as exc:  # reported through start() or the results
            self.error = self.error or repr(exc)
        finally:
            self._ready.set()

    async def _run(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(
                    self.url,
                    protocols=("prefect",),
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    max_msg_size=0,
                ) as ws,
            ):
                await ws.send_json({"type": "auth", "token": None})
                answer = await ws.receive_json(timeout=10)
                if answer.get("type") != "auth_success":
                    self.error = f"handshake answered {answer!r}"
                    return
                await ws.send_json({"type": "filter", "filter": self.filter, "backfill": False})
                self._ready.set()
                async for msg in ws:
                    arrived = time.time()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    self.frames += 1
                    frame = json.loads(msg.data)
                    event = frame.get("event") if isinstance(frame, dict) else None
                    if not isinstance(event, dict):
                        continue
                    key = next(
                        (
                            r["prefect.resource.id"][len(HOLDER_PREFIX) :]
                            for r in event.get("related") or []
                            if str(r.get("prefect.resource.id", "")).startswith(HOLDER_PREFIX)
                        ),
                        None,
                    )
                    self.arrivals.append(
                        Arrival(
                            arrived,
                            str(event.get("event")),
                            key,
                            _epoch(event.get("occurred")) or 0.0,
                            _epoch(event.get("received")),
                        )
                    )
                if ws.close_code not in (None, 1000):
                    self.error = f"closed by the server with code {ws.close_code}"
        except asyncio.CancelledError:
            return


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# --- 1. contended hand-off -----------------------------------------------------------------------


def _prime(server: servers.Server, name: str, hold: float, cycles: int = 12) -> None:
    """Teach a fresh limit its hold time (its Retry-After is built on a moving average of holds
    that starts at 2 s): a few acquire, hold, release cycles, as the workload will do."""
    for _ in range(cycles):
        status, body, _ = request_json(
            "POST",
            server.base_url + "/api/v2/concurrency_limits/increment-with-lease",
            {"names": [name], "slots": 1, "lease_duration": 300},
        )
        if status != 200:
            return
        time.sleep(hold)
        request_json(
            "POST",
            server.base_url + "/api/v2/concurrency_limits/decrement-with-lease",
            {"lease_id": body["lease_id"]},
        )


def measure_handoff(ctx: Context, server: servers.Server, variant: str, rnd: int) -> dict[str, Any]:
    """Limit 1, ``handoff_workers`` workers: acquire, hold, release, in a loop.

    ``variant``: "wait" (raw requests with ``wait_seconds``), "sdk" (slotkeeper's SDK,
    ``async with concurrency(...)``), "poll" (raw requests, sleeping ``Retry-After``) or
    "floor" (the machine's floor, see :func:`measure_floor`: ``server`` is not used then, and
    stays frozen).
    """
    if variant in FLOORS:
        return measure_floor(ctx, rnd, durable=variant == FLOOR_DURABLE)
    x = ctx.extra
    name = f"handoff-{variant}-r{rnd}-{uuid.uuid4().hex[:6]}"
    with active(ctx, server):
        create_limit(server, name, 1)
        _prime(server, name, x.handoff_hold)
        params = {"limit": name, "hold": x.handoff_hold, "wait_seconds": 60.0 if variant == "wait" else None}
        kind = "handoff-sdk" if variant == "sdk" else "handoff"
        w = _run_handoff(ctx, server, kind, params)
    return _handoff_result(server, variant, rnd, w, x)


def measure_floor(ctx: Context, rnd: int, durable: bool = False) -> dict[str, Any]:
    """The hand-off's machine floor: the same workers, hold and analysis against
    ``benchmarks/floor.py`` (one lock in memory, a one-byte protocol over raw TCP; no HTTP, no
    database), started for this measurement on a free port and stopped after it, while every
    server of the comparison stays frozen. What no server can beat on this machine.
    ``durable``: the durable floor (``--fsync``: one ``fdatasync`` per grant), reported as
    target and variant :data:`FLOOR_DURABLE`."""
    x = ctx.extra
    variant = FLOOR_DURABLE if durable else FLOOR
    floor = start_floor(durable)
    try:
        problem = floor_ready(floor)
        if problem:
            out = _base("handoff", floor, variant, rnd)
            out["failed"] = f"the floor server {problem}"
            return out
        w = _run_handoff(ctx, floor, "handoff-floor", {"hold": x.handoff_hold})
    finally:
        servers.stop_all([floor], timeout=5.0)
    return _handoff_result(floor, variant, rnd, w, x)


def start_floor(durable: bool = False) -> servers.Server:
    """Start ``benchmarks/floor.py serve`` on a free loopback port (readiness not awaited);
    ``durable``: with ``--fsync`` to a log in its temporary home."""
    home = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    python = servers.SLOTKEEPER_VENV / "bin" / "python"
    command = [
        str(python if python.exists() else Path(sys.executable)),
        str(FLOOR_SCRIPT),
        "serve",
        "--host",
        servers.LOOPBACK,
        "--port",
        str(servers.free_port()),
    ]
    if durable:
        command += ["--fsync", str(home / "grants.log")]
    return servers._spawn(FLOOR_DURABLE if durable else FLOOR, command, servers._clean_env(), home, {})


def floor_ready(floor: servers.Server, timeout: float = 10.0) -> str | None:
    """Wait until the floor server grants and takes back its lock once; None, else why not."""
    deadline = time.monotonic() + timeout
    why = "did not answer"
    while time.monotonic() < deadline:
        if floor.proc.poll() is not None:
            return f"exited with code {floor.proc.returncode}: {floor.log_tail(5)}"
        try:
            with socket.create_connection((servers.LOOPBACK, floor.port), timeout=1.0) as sock:
                sock.sendall(b"a")
                granted = sock.recv(1)
                sock.sendall(b"r")
                released = sock.recv(1)
            if (granted, released) == (b"g", b"k"):
                return None
            why = f"answered {granted!r} {released!r} to a probe"
        except OSError as exc:
            why = f"did not answer ({exc!r})"
        time.sleep(0.02)
    return f"{why} within {timeout:g} s"


def _run_handoff(ctx: Context, server: servers.Server, kind: str, params: dict[str, Any]) -> Window:
    """The hand-off's load: every worker in the first load-generator process (one clock and one
    event loop order the records exactly), the other processes idle."""
    x = ctx.extra
    clients = tuple(range(x.handoff_workers))
    grace = 2.0
    jobs = [_job(kind, server, clients, x.handoff_warmup, x.handoff_duration, grace, params)]
    jobs += [
        _job(kind, server, (), x.handoff_warmup, x.handoff_duration, grace, params) for _ in ctx.pool.pids[1:]
    ]
    return run_jobs(ctx, server, jobs, x.handoff_warmup, x.handoff_duration)


def _handoff_result(server: servers.Server, variant: str, rnd: int, w: Window, x: Extra) -> dict[str, Any]:
    out = _base("handoff", server, variant, rnd)
    out.update(analyze_handoff(w.merged.records, w.start, w.end, x.handoff_hold, x.handoff_workers))
    out["retry_after_ms"] = pct(w.merged.retry_afters)
    out["errors"] = w.merged.errors
    out["unfinished"] = w.merged.unfinished
    out["cpu"] = w.cpu
    out["notes"] = w.merged.notes
    return out


def _merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class _Coverage:
    """How much of a time span the slot was held (by anyone): prefix sums over hold intervals."""

    def __init__(self, intervals: list[tuple[float, float]]) -> None:
        self.spans = _merge_intervals(intervals)
        self.starts = [a for a, _ in self.spans]
        self.cum = [0.0]
        for a, b in self.spans:
            self.cum.append(self.cum[-1] + (b - a))

    def upto(self, t: float) -> float:
        i = bisect.bisect_right(self.starts, t)
        if i == 0:
            return 0.0
        a, b = self.spans[i - 1]
        return self.cum[i - 1] + (min(t, b) - a)

    def between(self, a: float, b: float) -> float:
        return max(0.0, self.upto(b) - self.upto(a))


def analyze_handoff(
    records: list[tuple[Any, ...]], start: float, end: float, hold: float, workers: int
) -> dict[str, Any]:
    """Throughput, waits, fairness and order of a hand-off run, from the raw records.

    Records are ``(worker, requested, granted|None, released|None, attempts|None, release
    answered|None)``, wall clock, as the workers saw them (attempts is None where the client does
    not know it: the SDK). A grant counts when it arrived inside the window.

    - **wait**: granted - requested.
    - **wait beyond the ideal**: the part of the wait during which nobody held the slot. A
      perfect scheduler keeps the slot busy whenever someone waits, so this is 0 for it, and
      exactly what polling sleeps and hand-off latency add.
    - **hand-off gap**: for consecutive grants while someone was waiting, the next grant's
      arrival minus the previous holder's release request.
    - **overtake**: a grant to worker W while worker V, which had been waiting since before W's
      previous grant, still was (W was served twice while V waited).
    """
    granted = sorted((r for r in records if r[2] is not None), key=lambda r: r[2])
    inside = [r for r in granted if start <= r[2] < end]
    coverage = _Coverage([(r[2], r[3]) for r in granted])
    waits = [r[2] - r[1] for r in inside]
    excess = [max(0.0, (r[2] - r[1]) - coverage.between(r[1], r[2])) for r in inside]
    gaps = []
    for prev, nxt in itertools.pairwise(granted):
        if start <= nxt[2] < end and nxt[1] < prev[3]:
            gaps.append(max(0.0, nxt[2] - prev[3]))
    holds = [r[3] - r[2] for r in inside]
    # The release's own round trip: what a hand-off costs at least (the grant rides on it).
    release_rtts = [r[5] - r[3] for r in inside if r[5] is not None]
    per_worker = Counter(r[0] for r in inside)
    counts = [per_worker.get(w, 0) for w in range(workers)]
    # Overtakes: the acquisitions of each worker in order, ungranted ones waiting forever.
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for r in sorted(records, key=lambda r: r[1]):
        by_worker.setdefault(r[0], []).append((r[1], math.inf if r[2] is None else r[2]))
    requested = {v: [req for req, _ in acqs] for v, acqs in by_worker.items()}
    overtakes = overtaken_grants = 0
    for w, acqs in by_worker.items():
        for (_, g1), (_, g2) in itertools.pairwise(acqs):
            if not (start <= g2 < end) or g1 == math.inf:
                continue
            victims = 0
            for v, other in by_worker.items():
                if v == w:
                    continue
                # v's acquisition pending at g1: the last one requested before g1.
                i = bisect.bisect_left(requested[v], g1) - 1
                if i >= 0 and other[i][1] > g2:
                    victims += 1
            overtakes += victims
            overtaken_grants += victims > 0
    seconds = end - start
    attempts = [r[4] for r in inside if r[4] is not None]
    measured_hold = statistics.fmean(holds) if holds else None
    return {
        "workers": workers,
        "hold_ms": hold * 1000,
        "grants": len(inside),
        "grants_per_s": len(inside) / seconds,
        "ideal_per_s": 1.0 / hold,
        "pct_of_ideal": 100.0 * len(inside) / seconds * hold,
        "measured_hold_ms": 1000 * measured_hold if measured_hold else None,
        # Secondary: against the holds as they lasted (asyncio.sleep overshoots the nominal hold).
        "pct_of_ideal_measured_hold": 100.0 * len(inside) / seconds * measured_hold
        if measured_hold
        else None,
        "wait_ms": pct(waits),
        "excess_ms": pct(excess),
        "gap_ms": pct(gaps),
        "release_rtt_ms": pct(release_rtts),
        "wait_quantiles": quantiles(waits),
        "excess_quantiles": quantiles(excess),
        "per_worker": counts,
        "jain": jain(counts),
        "overtakes": overtakes,
        "overtaking_grants": overtaken_grants,
        "attempts_per_grant": statistics.fmean(attempts) if attempts else None,
        "abandoned": sum(1 for r in records if r[2] is None),
    }


# --- the SDK against the Redis semaphore ----------------------------------------------------------


def measure_sdk(ctx: Context, server: servers.Server, variant: str, rnd: int) -> dict[str, Any]:
    """Acquire + release blocks per second from one fresh Python process with ``sdk_holders``
    concurrent holders (``benchmarks/sdk_vs_redis.py``'s measurement): ``variant`` "session"
    (slotkeeper's SDK, ``server`` a slotkeeper whose ``bench-*`` limits exist) or "redis" (the
    Redis semaphore through redis-py, ``server`` the Redis reference)."""
    import sdk_vs_redis

    x = ctx.extra
    target = f"{servers.LOOPBACK}:{server.port}" if server.key == "redis" else server.base_url + "/api"
    with active(ctx, server):
        got = sdk_vs_redis.measure(
            variant, target, server, holders=x.sdk_holders, warmup=x.sdk_warmup, seconds=x.sdk_duration
        )
    out = _base("sdk", server, variant, rnd)
    if "failed" in got:
        out["failed"] = "; ".join(got["failed"])
        return out
    out.update({k: v for k, v in got.items() if k != "variant"})
    out["holders"] = x.sdk_holders
    return out


# --- 2. Prefect's own concurrency() client -------------------------------------------------------


def measure_client(ctx: Context, server: servers.Server, rnd: int) -> list[dict[str, Any]]:
    """16 tasks x 5 blocks of Prefect's ``concurrency()`` on a limit of 1 and of 4, 10 ms holds."""
    x = ctx.extra
    tag = uuid.uuid4().hex[:6]
    warm = f"client-warm-r{rnd}-{tag}"
    runs = [(f"client-{limit}-r{rnd}-{tag}", limit) for limit in x.client_limits]
    script = Path(__file__).with_name("prefect_client.py")
    python = servers.PREFECT_VENV / "bin" / "python"
    budget = x.client_timeout * len(runs) + 90.0
    with active(ctx, server), tempfile.TemporaryDirectory(prefix="bench-client-") as home:
        create_limit(server, warm, 1)
        for name, limit in runs:
            create_limit(server, name, limit)
            _prime(server, name, x.client_hold)
        env = servers._clean_env(
            PREFECT_API_URL=server.base_url + "/api",
            PREFECT_HOME=home,
            PREFECT_LOGGING_LEVEL="WARNING",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        command = [str(python), str(script), "--warm", warm]
        for name, limit in runs:
            command += ["--run", f"{name}:{limit}"]
        command += [
            "--tasks",
            str(x.client_tasks),
            "--blocks",
            str(x.client_blocks),
            "--hold",
            str(x.client_hold),
            "--timeout",
            str(x.client_timeout),
        ]
        pids = server.pids()
        cpu0, t0 = servers.cpu_seconds(pids), time.monotonic()
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=budget, check=False
            )
            failure = (
                None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-400:]}"
            )
        except subprocess.TimeoutExpired as exc:
            tail = (
                exc.stderr.decode(errors="replace")
                if isinstance(exc.stderr, bytes)
                else str(exc.stderr or "")
            )
            done, failure = None, f"no answer within {budget:g} s ({tail.strip()[-300:]})"
        server_cpu = servers.cpu_seconds(pids) - cpu0
        elapsed = time.monotonic() - t0
    out: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    if done is not None and failure is None:
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            failure = f"unreadable output: {done.stdout.strip()[-300:]!r}"
    for i, (_, limit) in enumerate(runs):
        m = _base("client", server, f"limit-{limit}", rnd)
        run = (result.get("runs") or [None] * len(runs))[i] if not failure else None
        if run is None:
            m.update({"limit": limit, "failed": failure or "no result"})
            out.append(m)
            continue
        ideal = run["blocks"] * run["hold_s"] / limit
        rate = run["completed"] / run["wall_s"] if run["wall_s"] > 0 else 0.0
        m.update(
            {
                "limit": limit,
                "blocks": run["blocks"],
                "completed": run["completed"],
                "finished": run["finished"],
                "wall_s": run["wall_s"],
                # A run cut off is projected to all its blocks at the rate it had.
                "wall_projected_s": run["wall_s"]
                if run["finished"]
                else (run["blocks"] / rate if rate else None),
                "ideal_s": ideal,
                "client_cpu_s": run["cpu_s"],
                "wall_per_cpu": run["wall_s"] / run["cpu_s"] if run["cpu_s"] > 0 else None,
                "blocks_per_s": rate,
                "most_inside": run["most_inside"],
                "errors_seen": run["errors"],
                "import_s": result.get("import_s"),
                "server_cpu_s_whole_script": server_cpu,
                "script_s": elapsed,
            }
        )
        out.append(m)
    return out


# --- 3. rate-limit accuracy ----------------------------------------------------------------------


def measure_rate(ctx: Context, server: servers.Server, rnd: int) -> dict[str, Any]:
    """A fresh limit of 10 decaying 10 slots/s; clients take rate_limit slots as fast as allowed."""
    x = ctx.extra
    name = f"rate-r{rnd}-{uuid.uuid4().hex[:6]}"
    with active(ctx, server):
        create_limit(server, name, x.rate_limit, slot_decay_per_second=x.rate_decay)
        jobs = spread_jobs("rate", ctx, server, x.rate_clients, 0.0, x.rate_duration, 1.0, {"limit": name})
        w = run_jobs(ctx, server, jobs, 0.0, x.rate_duration)
    out = _base("rate", server, "rate_limit", rnd)
    out.update(analyze_rate([r[1] for r in w.merged.records], w.start, w.end, x.rate_limit, x.rate_decay))
    refusals = len(w.merged.retry_afters)
    out["refusals"] = refusals
    out["requests_per_grant"] = (out["grants"] + refusals) / out["grants"] if out["grants"] else None
    out["retry_after_ms"] = pct(w.merged.retry_afters)
    out["errors"] = w.merged.errors
    out["cpu"] = w.cpu
    out["notes"] = w.merged.notes
    return out


def analyze_rate(times: list[float], start: float, end: float, limit: int, decay: float) -> dict[str, Any]:
    """Burst, steady rate after the first second, per-second counts, and any over-admission.

    A limit of ``limit`` slots decaying ``decay`` per second allows, from an empty start, at most
    ``limit + decay * t`` grants by time ``t``: the largest excess over that bound (answers
    arrive after the server decided, so the bound holds for them too) shows over-admission.
    """
    times = sorted(times)
    seconds = end - start
    burst = sum(1 for t in times if t < start + 0.5)
    steady = [t for t in times if t >= start + 1.0]
    bins = [0] * max(1, math.ceil(seconds))
    for t in times:
        bins[min(len(bins) - 1, int(t - start))] += 1
    excess = max((i + 1 - (limit + decay * (t - start)) for i, t in enumerate(times)), default=0.0)
    return {
        "limit": limit,
        "decay_per_s": decay,
        "grants": len(times),
        "burst": burst,
        "steady_per_s": len(steady) / (seconds - 1.0) if seconds > 1.0 else None,
        "pct_of_rate": 100.0 * len(steady) / (seconds - 1.0) / decay if seconds > 1.0 else None,
        "per_second": bins,
        "max_excess": excess,
    }


# --- 5. event delivery ---------------------------------------------------------------------------


def _probe(ctx: Context, server: servers.Server, sub: Subscriber, emit: bool) -> str | None:
    """Check the live stream delivers before loading it: None if a probe event arrived."""
    key = str(uuid.uuid4())
    if emit:
        from loadgen import client_event

        event = json.loads(
            client_event(ACQUIRED, {"id": str(uuid.uuid4()), "name": "probe", "limit": 1}, key)
        )
        status, _, _ = request_json("POST", server.base_url + "/api/events", [event])
        if status >= 300:
            return f"posting a probe event answered {status}"
    else:
        status, body, _ = request_json(
            "POST",
            server.base_url + "/api/v2/concurrency_limits/increment-with-lease",
            {
                "names": ["bench-0"],
                "slots": 1,
                "lease_duration": 300,
                "holder": {"type": "task_run", "id": key},
            },
        )
        if status != 200:
            return f"the probe acquisition answered {status}"
        request_json(
            "POST",
            server.base_url + "/api/v2/concurrency_limits/decrement-with-lease",
            {"lease_id": body["lease_id"]},
        )
    if wait_for(lambda: any(a.key == key for a in list(sub.arrivals)), 10.0):
        return None
    return "a probe event did not arrive within 10 s"


def measure_events(ctx: Context, server: servers.Server, rnd: int) -> dict[str, Any]:
    """Paced acquire + release pairs with a websocket subscriber; acquired-event delivery latency.

    slotkeeper writes the acquired event itself, in the acquisition's transaction. Prefect's
    server writes none (its client does, after the acquisition answered), so for Prefect the
    load sends the event over ``/api/events/in`` right after each answer, as Prefect's client
    does, and the latency covers that path: answer, client emission, server pipeline, subscriber.
    """
    x = ctx.extra
    emit = not server.key.startswith("slotkeeper")
    out = _base("events", server, "client-emitted" if emit else "server-written", rnd)
    sub = Subscriber(server.base_url)
    with active(ctx, server):
        try:
            problem = sub.start() or _probe(ctx, server, sub, emit)
            if problem:
                out["failed"] = problem
                return out
            sub.arrivals.clear()
            interval = x.events_clients / x.events_rate
            jobs = spread_jobs(
                "events",
                ctx,
                server,
                x.events_clients,
                x.events_warmup,
                x.events_duration,
                1.0,
                {"interval": interval, "emit": emit},
            )
            w = run_jobs(ctx, server, jobs, x.events_warmup, x.events_duration)
            wanted = {r[0] for r in w.merged.records}
            wait_for(lambda: wanted <= {a.key for a in list(sub.arrivals) if a.event == ACQUIRED}, 3.0, 0.1)
        finally:
            sub.stop()
    arrived = {a.key: a for a in sub.arrivals if a.event == ACQUIRED and a.key}
    latencies, from_occurred = [], []
    for key, answered in w.merged.records:
        a = arrived.get(key)
        if a is not None:
            latencies.append(a.arrived - answered)
            from_occurred.append(a.arrived - a.occurred)
    seconds = w.end - w.start
    out.update(
        {
            "offered_per_s": x.events_rate,
            "pairs_per_s": w.merged.completed / seconds,
            "acquired": len(w.merged.records),
            "delivered": len(latencies),
            "missing": len(w.merged.records) - len(latencies),
            "latency_ms": pct(latencies),
            "occurred_to_arrival_ms": pct(from_occurred),
            "latency_quantiles": quantiles(latencies),
            "acquire_ms": report.latency_summary(w.merged.latencies),
            "frames": sub.frames,
            "unfinished": w.merged.unfinished,
            "subscriber_error": sub.error,
            "errors": w.merged.errors,
            "cpu": w.cpu,
            "notes": w.merged.notes,
        }
    )
    return out
