"""Benchmarks of slotkeeper's concurrency events (issue 3). Figures, not tests: nothing asserts.

Two measurements, each on SQLite and on PostgreSQL:

1. **Delivery latency** (``latency``): a real server process (uvicorn, uvloop, httptools, as
   ``slotkeeper server start``) grants and releases slots at a steady rate (open loop: pair *i*
   is sent at ``t0 + i / rate`` whatever happened to the previous ones), while one websocket
   subscriber, in a process of its own, follows ``/api/events/out``. For every slot event the
   subscriber records ``receipt time - occurred``. ``occurred`` is taken inside the change's
   transaction, just before it commits (on SQLite, before its group commits), so this is an
   upper bound of commit-to-delivery. All processes share the machine's clock. The subscriber
   also checks that each event arrives once and none is missing.

2. **Cost of writing events** (``overhead``): slotkeeper has no switch to turn events off, so the
   same in-process storage is measured with its event code replaced, in alternating rounds of
   the same run: ``events`` (as shipped), ``outbox`` (in process only: as shipped in gateway
   mode, each event also queued in the outbox for the upstream, never delivered here),
   ``no-write`` (``write_events`` is a no-op: the events are built but neither inserted nor
   published) and ``no-events`` (the builders return one constant record as well: no event work
   at all). Each round runs ``--clients`` concurrent
   loops of acquire-with-lease + release on their own limits for ``--seconds``; the mode order
   rotates every round. The figure is the per-round ratio of pairs/s with events to pairs/s
   without, median and range across rounds.

Usage::

    .venv/bin/python benchmarks/events.py                       # both, both backends
    .venv/bin/python benchmarks/events.py latency --rate 500 --seconds 20
    .venv/bin/python benchmarks/events.py overhead --rounds 6 --seconds 3 --clients 16
    .venv/bin/python benchmarks/events.py --backends sqlite     # or postgres

PostgreSQL runs use a fresh database on ``BENCH_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), created and dropped by the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "postgres")
SLOT_PREFIX = "prefect.concurrency-limit."
LIMITS = 64
#: Pairs in flight beyond which the latency load sheds (not sends) pairs: a server slower than
#: the rate is then measured at its own pace instead of under an ever-growing backlog.
MAX_IN_FLIGHT = 256


# --- helpers ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def busy_cores() -> Callable[[], float]:
    """Start measuring the machine's busy CPU; the returned function gives busy cores since."""

    def sample() -> tuple[float, float]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values[:8]) - idle, time.monotonic()

    busy0, t0 = sample()
    tick = os.sysconf("SC_CLK_TCK")

    def cores() -> float:
        busy1, t1 = sample()
        return (busy1 - busy0) / tick / max(t1 - t0, 1e-9)

    return cores


@contextlib.contextmanager
def database(backend: str, home: Path) -> Iterator[str]:
    """A fresh database URL: a SQLite file under ``home``, or a PostgreSQL database of the run."""
    if backend == "sqlite":
        yield f"sqlite:///{home / 'slotkeeper.db'}"
        return
    import psycopg

    name = f"slotkeeper_evbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def postgres_missing() -> str | None:
    try:
        import psycopg

        psycopg.connect(ADMIN_URL, connect_timeout=3).close()
    except Exception as exc:
        return f"{ADMIN_URL} unreachable: {str(exc).strip().splitlines()[0]}"
    return None


# --- 1. delivery latency ------------------------------------------------------------------------


@contextlib.contextmanager
def server_process(database_url: str, home: Path, mode: str | None = None) -> Iterator[tuple[str, int]]:
    """slotkeeper served as ``slotkeeper server start`` serves it (uvicorn, uvloop, httptools);
    with ``mode``, through this script's ``_serve`` command (its event code replaced, see
    :func:`events_mode`). Yields the ``/api`` URL and the process id."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTKEEPER_")}
    env.update(SLOTKEEPER_HOME=str(home), SLOTKEEPER_DATABASE_URL=database_url)
    if mode is None:
        command = [sys.executable, "-m", "uvicorn", "slotkeeper.api.app:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools"]
        command += ["--no-access-log", "--log-level", "warning"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "_serve", mode, str(port)]
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server did not start:\n{(home / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def serve(mode: str, port: int) -> None:
    """The ``_serve`` command: the app with its event code replaced, served as usual."""
    import uvicorn

    from slotkeeper.api.app import create_app

    with events_mode(mode):
        uvicorn.run(
            create_app(),
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
        )


def _occurred(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def subscriber_main(url: str, probe_id: str, conn: Any) -> None:
    """The subscriber process: follow the slot events, send back (occurred, latency, id) rows."""

    async def run() -> None:
        rows: list[tuple[float, float, str, str]] = []
        ws_url = "ws" + url.removeprefix("http") + "/events/out"
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, protocols=["prefect"]) as ws:
            await ws.send_str('{"type": "auth", "token": null}')
            await ws.receive()
            # The probe (stored before) comes by backfill: the live subscription is then in place.
            await ws.send_str(orjson.dumps({"type": "filter", "filter": {}, "backfill": True}).decode())
            while orjson.loads((await ws.receive()).data)["event"]["id"] != probe_id:
                pass
            conn.send("ready")
            stop = asyncio.get_running_loop().run_in_executor(None, conn.recv)
            while not stop.done():
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    break
                now = time.time()
                msg = receive.result()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    conn.send(("closed", ws.close_code, str(msg.extra)))
                    return
                event = orjson.loads(msg.data)["event"]
                if event["event"].startswith(SLOT_PREFIX):
                    occurred = _occurred(event["occurred"])
                    rows.append((occurred, now - occurred, event["id"], event["event"]))
        conn.send(("rows", rows))

    asyncio.run(run())


@dataclass
class LatencyResult:
    backend: str
    rate: float
    seconds: float
    pairs_sent: int = 0
    pairs_done: int = 0
    acquired_ok: int = 0
    shed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    duplicates: int = 0
    missing: int = 0
    grants_per_s: float = 0.0
    busy: float = 0.0
    server_cores: float = 0.0
    note: str = ""


async def _load(
    url: str, rate: float, warmup: float, seconds: float, result: LatencyResult
) -> tuple[float, float]:
    """Open-loop acquire + release pairs at ``rate``/s; returns the measured window (wall clock)."""
    connector = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(connector=connector) as http:
        acquire = url + "/v2/concurrency_limits/increment-with-lease"
        release = url + "/v2/concurrency_limits/decrement-with-lease"

        async def pair(i: int) -> None:
            body = orjson.dumps({"names": [f"bench-{i % LIMITS}"], "slots": 1, "lease_duration": 300})
            try:
                async with http.post(acquire, data=body, headers={"Content-Type": "application/json"}) as r:
                    if r.status != 200:
                        result.failures[f"acquire:{r.status}"] = (
                            result.failures.get(f"acquire:{r.status}", 0) + 1
                        )
                        return
                    lease = (await r.json())["lease_id"]
                result.acquired_ok += 1
                data = orjson.dumps({"lease_id": lease})
                async with http.post(release, data=data, headers={"Content-Type": "application/json"}) as r:
                    if r.status != 204:
                        result.failures[f"release:{r.status}"] = (
                            result.failures.get(f"release:{r.status}", 0) + 1
                        )
                        return
                result.pairs_done += 1
            except aiohttp.ClientError as exc:
                name = type(exc).__name__
                result.failures[name] = result.failures.get(name, 0) + 1

        tasks: set[asyncio.Task[None]] = set()
        start = time.time() + 0.2
        total = int(rate * (warmup + seconds))
        loop = asyncio.get_running_loop()
        for i in range(total):
            delay = start + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= MAX_IN_FLIGHT:  # the server is behind: shed, do not pile up
                result.shed += 1
                continue
            task = loop.create_task(pair(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        result.pairs_sent = total
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return start + warmup, start + warmup + seconds


def measure_latency(backend: str, rate: float, warmup: float, seconds: float) -> LatencyResult:
    result = LatencyResult(backend, rate, seconds)
    home = Path(tempfile.mkdtemp(prefix=f"evbench-{backend}-"))
    try:
        with database(backend, home) as db_url, server_process(db_url, home) as (url, server_pid):

            async def prepare() -> str:
                async with aiohttp.ClientSession() as http:
                    for i in range(LIMITS):
                        body = {"name": f"bench-{i}", "limit": 100_000}
                        async with http.post(url + "/v2/concurrency_limits/", json=body) as r:
                            assert r.status == 201, await r.text()
                    probe = {
                        "occurred": datetime.now().astimezone().isoformat(),
                        "event": "bench.probe",
                        "resource": {"prefect.resource.id": "bench.probe"},
                        "id": str(uuid.uuid4()),
                    }
                    async with http.post(url + "/events", json=[probe]) as r:
                        assert r.status == 204, await r.text()
                    return str(probe["id"])

            probe_id = asyncio.run(prepare())
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            sub = ctx.Process(target=subscriber_main, args=(url, probe_id, child), daemon=True)
            sub.start()
            if not parent.poll(60) or parent.recv() != "ready":
                raise RuntimeError("the subscriber did not start")
            cores = busy_cores()
            cpu0, t0 = _proc_cpu([server_pid]), time.monotonic()
            window = asyncio.run(_load(url, rate, warmup, seconds, result))
            result.server_cores = (_proc_cpu([server_pid]) - cpu0) / (time.monotonic() - t0)
            result.busy = cores()
            time.sleep(1.0)  # let the last events arrive
            parent.send("stop")
            message: tuple[Any, ...] = parent.recv() if parent.poll(60) else ("missing", None)
            sub.join(10)
            if message[0] == "closed":
                result.note = f"subscriber closed by the server: code {message[1]} {message[2]}"
                return result
            if message[0] != "rows":
                result.note = "the subscriber did not send its rows within 60 s"
                return result
            rows: list[Any] = message[1]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    in_window = [r for r in rows if window[0] <= r[0] < window[1]]
    ids = [r[2] for r in rows]
    result.duplicates = len(ids) - len(set(ids))
    result.latencies_ms = [r[1] * 1000 for r in in_window]
    granted = sum(1 for r in in_window if r[3].endswith(".acquired"))
    result.grants_per_s = granted / seconds
    # Every acquire answered 200 wrote one acquired event, every release 204 one released event.
    result.missing = result.acquired_ok + result.pairs_done - len(set(ids))
    return result


def report_latency(r: LatencyResult) -> None:
    print(
        f"\n== latency, {r.backend}: target {r.rate:g} grants/s + {r.rate:g} releases/s, {r.seconds:g} s window"
    )
    if r.note:
        print(f"   {r.note}")
    if not r.latencies_ms:
        print("   no events measured")
        return
    lat = r.latencies_ms
    print(
        f"   achieved {r.grants_per_s:.0f} grants/s; pairs scheduled {r.pairs_sent}, shed {r.shed} "
        f"(server behind), completed {r.pairs_done}, failures {r.failures or 0}"
    )
    print(
        f"   occurred -> subscriber (ms) over {len(lat)} events: p50 {percentile(lat, 50):.2f}  "
        f"p90 {percentile(lat, 90):.2f}  p99 {percentile(lat, 99):.2f}  max {max(lat):.2f}"
    )
    print(f"   events received twice {r.duplicates}, missing {r.missing}")
    print(
        f"   server process {r.server_cores:.2f} cores (one event loop: saturated near 1); machine {r.busy:.2f} busy"
    )
    verdict = "meets" if percentile(lat, 99) < 20 else "misses"
    print(f"   target p99 < 20 ms: {verdict}")


# --- 2. the cost of writing events --------------------------------------------------------------

MODES = ("events", "no-write", "no-events")
#: In process, also gateway mode's outbox (``Storage.outbox_store().enable()``).
IN_PROCESS_MODES = ("events", "outbox", "no-write", "no-events")


@contextlib.contextmanager
def events_mode(mode: str) -> Iterator[None]:
    """Replace the event code of the storage for the duration (see the module docstring)."""
    from slotkeeper.events import builders
    from slotkeeper.events.models import EventRecord
    from slotkeeper.storage import slots

    # The acquire/release scripts (storage/slots.py) write their events with this name.
    saved_write, saved_build = slots.write_events, builders.slot_event
    constant = EventRecord(
        id=str(uuid.uuid4()), occurred=0.0, event="x", resource={"prefect.resource.id": "x"}
    )
    try:
        if mode in ("no-write", "no-events"):

            def built_only(tx: Any, events: Any, *, dedupe: bool = False) -> list[EventRecord]:
                return list(events)

            slots.write_events = built_only
        if mode == "no-events":

            def constant_event(*args: Any, **kwargs: Any) -> EventRecord:
                return constant

            builders.slot_event = constant_event
        yield
    finally:
        slots.write_events, builders.slot_event = saved_write, saved_build


def _proc_cpu(pids: list[int]) -> float:
    """User + system CPU seconds used so far by other processes (PostgreSQL's backends)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _pairs(storage: Any, clients: int, seconds: float, backend_pids: list[int]) -> tuple[float, float]:
    """Acquire + release loops for ``seconds``: (pairs per second, CPU microseconds per pair).

    The CPU is this process's (every thread: the event loop, SQLite's threads, the PostgreSQL
    pool threads) plus the database server's backends serving it, so it is the whole cost of a
    pair whatever else keeps the machine busy.
    """
    from slotkeeper.models import AcquireRequest, LeaseSpec

    stop = time.monotonic() + seconds
    done = 0

    async def client(i: int) -> None:
        nonlocal done
        request = AcquireRequest([f"bench-{i}"], 1, lease=LeaseSpec(300.0))
        while time.monotonic() < stop:
            granted = await storage.acquire(request)
            await storage.release_lease(granted.lease_id)
            done += 1

    cpu0, db0, start = time.process_time(), _proc_cpu(backend_pids), time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0 + _proc_cpu(backend_pids) - db0
    return done / elapsed, cpu / max(done, 1) * 1e6


@dataclass
class OverheadResult:
    backend: str  # and the level
    #: Per round and mode: (pairs/s, CPU µs per pair).
    rounds: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    busy: float = 0.0


def _backend_pids(db_url: str) -> list[int]:
    """The PostgreSQL backends connected to this run's database (the storage's pool)."""
    if not db_url.startswith("postgresql"):
        return []
    import psycopg

    name = db_url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()
    return [int(r[0]) for r in rows]


async def _overhead(db_url: str, backend: str, clients: int, seconds: float, rounds: int) -> OverheadResult:
    from slotkeeper.models import LimitSpec
    from slotkeeper.storage import migrate, open_storage

    await asyncio.to_thread(migrate, db_url)
    storage = open_storage(db_url)
    result = OverheadResult(f"{backend}, in-process storage")
    try:
        for i in range(clients):
            await storage.create_limit(LimitSpec(name=f"bench-{i}", limit=1000))
        with events_mode("events"):
            await _pairs(storage, clients, 1.0, [])  # warm-up: every pool connection is open after
        pids = _backend_pids(db_url)
        cores = busy_cores()
        for r in range(rounds):
            modes = IN_PROCESS_MODES
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            figures: dict[str, tuple[float, float]] = {}
            for mode in order:
                storage.backend.outbox = mode == "outbox"  # gateway mode's extra insert
                with events_mode("events" if mode == "outbox" else mode):
                    figures[mode] = await _pairs(storage, clients, seconds, pids)
            result.rounds.append(figures)
            print(
                f"   round {r + 1}: "
                + "  ".join(f"{m} {figures[m][0]:.0f}/s {figures[m][1]:.0f} us" for m in modes),
                flush=True,
            )
        result.busy = cores()
    finally:
        await storage.close()
    return result


def measure_overhead(backend: str, clients: int, seconds: float, rounds: int) -> OverheadResult:
    home = Path(tempfile.mkdtemp(prefix=f"evbench-{backend}-"))
    try:
        with database(backend, home) as db_url:
            return asyncio.run(_overhead(db_url, backend, clients, seconds, rounds))
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def _http_pairs(
    url: str, clients: int, warmup: float, seconds: float, pids: list[int]
) -> tuple[float, float]:
    """Closed-loop acquire + release over HTTP, each client on its own limit and connection:
    (pairs per second in the window, server CPU microseconds per pair)."""
    acquire = url + "/v2/concurrency_limits/increment-with-lease"
    release = url + "/v2/concurrency_limits/decrement-with-lease"
    headers = {"Content-Type": "application/json"}
    window: list[float] = []  # [start, end] once known
    counted = 0
    stop = False

    async def client(i: int) -> None:
        nonlocal counted
        body = orjson.dumps({"names": [f"bench-{i}"], "slots": 1, "lease_duration": 300})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            while not stop:
                async with http.post(acquire, data=body, headers=headers) as r:
                    lease = (await r.json())["lease_id"]
                async with http.post(release, data=orjson.dumps({"lease_id": lease}), headers=headers) as r:
                    assert r.status == 204
                if len(window) == 1:
                    counted += 1

    async def clock() -> tuple[float, float]:
        nonlocal stop
        await asyncio.sleep(warmup)
        cpu0 = _proc_cpu(pids)
        window.append(time.monotonic())
        await asyncio.sleep(seconds)
        window.append(time.monotonic())
        cpu = _proc_cpu(pids) - cpu0
        done = counted
        stop = True
        return done / (window[1] - window[0]), cpu / max(done, 1) * 1e6

    tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
    figures = await clock()
    await asyncio.gather(*tasks)
    return figures


def measure_overhead_http(backend: str, clients: int, seconds: float, rounds: int) -> OverheadResult:
    """Three servers, one per mode, measured in turn (the others frozen with SIGSTOP)."""
    result = OverheadResult(f"{backend}, over HTTP")
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, list[int]]] = {}
        for mode in MODES:
            home = Path(tempfile.mkdtemp(prefix=f"evbench-{backend}-{mode}-"))
            stack.callback(shutil.rmtree, home, True)
            db_url = stack.enter_context(database(backend, home))
            url, pid = stack.enter_context(server_process(db_url, home, mode))

            async def prepare(url: str = url) -> None:
                async with aiohttp.ClientSession() as http:
                    for i in range(clients):
                        body = {"name": f"bench-{i}", "limit": 1000}
                        async with http.post(url + "/v2/concurrency_limits/", json=body) as r:
                            assert r.status == 201, await r.text()
                await _http_pairs(url, clients, 0.0, 1.0, [])  # warm-up; opens the pool

            asyncio.run(prepare())
            servers[mode] = (url, [pid, *_backend_pids(db_url)])
            os.killpg(pid, signal.SIGSTOP)
        cores = busy_cores()
        for r in range(rounds):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            figures: dict[str, tuple[float, float]] = {}
            for mode in order:
                url, pids = servers[mode]
                os.killpg(pids[0], signal.SIGCONT)
                try:
                    figures[mode] = asyncio.run(_http_pairs(url, clients, 0.5, seconds, pids))
                finally:
                    time.sleep(0.2)  # leftovers finish before the freeze
                    os.killpg(pids[0], signal.SIGSTOP)
            result.rounds.append(figures)
            print(
                f"   round {r + 1}: "
                + "  ".join(f"{m} {figures[m][0]:.0f}/s {figures[m][1]:.0f} us" for m in MODES),
                flush=True,
            )
        result.busy = cores()
    return result


def report_overhead(r: OverheadResult, clients: int, seconds: float) -> None:
    print(
        f"\n== cost of events, {r.backend}: {clients} clients, {len(r.rounds)} rounds x {seconds:g} s per mode"
    )
    for mode in r.rounds[0] if r.rounds else ():
        rates = [f[mode][0] for f in r.rounds]
        cpus = [f[mode][1] for f in r.rounds]
        print(
            f"   {mode:>9}: {statistics.median(rates):.0f} pairs/s [{min(rates):.0f}-{max(rates):.0f}], "
            f"{statistics.median(cpus):.0f} CPU us/pair [{min(cpus):.0f}-{max(cpus):.0f}]"
        )
    for base in ("no-events", "no-write"):
        ratios = [f["events"][0] / f[base][0] for f in r.rounds]
        cpu_ratios = [f[base][1] / f["events"][1] for f in r.rounds]
        print(
            f"   events vs {base}: throughput x{statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}] ({(1 - statistics.median(ratios)) * 100:.1f} % lower); "
            f"CPU per pair x{1 / statistics.median(cpu_ratios):.3f} "
            f"(as throughput: {(1 - statistics.median(cpu_ratios)) * 100:.1f} % lower)"
        )
    if r.rounds and "outbox" in r.rounds[0]:
        ratios = [f["outbox"][0] / f["events"][0] for f in r.rounds]
        cpu_ratios = [f["outbox"][1] / f["events"][1] for f in r.rounds]
        print(
            f"   outbox vs events (gateway mode's cost): throughput x{statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}]; CPU per pair x{statistics.median(cpu_ratios):.3f} "
            f"[{min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}]"
        )
    ratios = [f["events"][0] / f["no-events"][0] for f in r.rounds]
    verdict = "meets" if 1 - statistics.median(ratios) < 0.25 else "misses"
    print(f"   target < 25 % lower throughput: {verdict}; machine busy {r.busy:.2f} cores during the rounds")


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        serve(argv[1], int(argv[2]))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["latency", "overhead", "both"], default="both")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="sqlite,postgres (default both)")
    parser.add_argument(
        "--rate", default="500", help="latency: grants (and releases) per second; a list runs each"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="latency window (20) / overhead round per mode (2)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="latency: seconds before the window")
    parser.add_argument("--rounds", type=int, default=8, help="overhead: alternating rounds")
    parser.add_argument("--clients", type=int, default=16, help="overhead: concurrent acquire/release loops")
    parser.add_argument(
        "--level",
        choices=["storage", "http", "both"],
        default="both",
        help="overhead: in-process storage, HTTP servers",
    )
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if "postgres" in backends and (why := postgres_missing()):
        print(f"[bench] skipping PostgreSQL: {why}")
        backends.remove("postgres")
    print("command:", shlex.join([".venv/bin/python", "benchmarks/events.py", *argv]))
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.what in ("latency", "both"):
        for backend in backends:
            for rate in [float(x) for x in args.rate.split(",")]:
                report_latency(measure_latency(backend, rate, args.warmup, args.seconds or 20.0))
    if args.what in ("overhead", "both"):
        seconds = args.seconds or 2.0
        for backend in backends:
            if args.level in ("storage", "both"):
                print(f"\n[bench] cost of events on {backend}, in-process storage", flush=True)
                result = measure_overhead(backend, args.clients, seconds, args.rounds)
                report_overhead(result, args.clients, seconds)
            if args.level in ("http", "both"):
                print(f"\n[bench] cost of events on {backend}, over HTTP", flush=True)
                result = measure_overhead_http(backend, args.clients, seconds, args.rounds)
                report_overhead(result, args.clients, seconds)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
