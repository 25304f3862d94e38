"""What observing a server costs: metrics and a live subscriber, and a scrape with 10,000 limits.

    .venv/bin/python benchmarks/observability.py [--clients 16] [--rounds 4] [--duration 8]

1. **Overhead** (SQLite): two servers of the same code, each on a fresh database. *Observed*:
   metrics on (the default), one websocket subscriber to every event (filter ``{}``, as a
   dashboard that shows everything), and ``/metrics`` scraped every second (Prometheus' default
   is 15 s). *Bare*: ``SLOTKEEPER_METRICS_ENABLED=false``, no subscriber, no scrape. The same
   acquire + release pairs (``benchmarks/loadgen.py``, kind ``pairs``: each client its own limit)
   run against one server then the other, alternated, for several rounds, the other server frozen
   (SIGSTOP) meanwhile; pairs/s are compared round by round (the ratio observed / bare).
2. **Scrape** (SQLite, and PostgreSQL when reachable): a database with 10,000 limits, a tenth of
   them with a live lease and a few with queued waiters, served by one server; ``GET /metrics``
   is timed from the client, 30 times, after 3 unmeasured scrapes.

It prints its figures, the machine's load and the command; nothing is written elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import loadgen, scenarios, servers

SCRAPE_LIMITS = 10_000


def _get(url: str) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as answer:
        answer.read()
    return time.perf_counter() - began


def watcher_main(base_url: str, subscribe: bool, scrape_every: float, stop: Any, counted: Any) -> None:
    """A dashboard's load: /metrics every ``scrape_every`` s and, with ``subscribe``, every event
    over the websocket (Prefect's protocol: one message per event)."""
    import aiohttp

    async def scrape(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.get(base_url + "/metrics") as answer:
                await answer.read()
            await asyncio.sleep(scrape_every)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            scraping = asyncio.create_task(scrape(session))
            if not subscribe:
                while not stop.is_set():
                    await asyncio.sleep(0.2)
            else:
                ws_url = base_url.replace("http://", "ws://") + "/api/events/out"
                async with session.ws_connect(ws_url, protocols=("prefect",)) as ws:
                    await ws.send_json({"type": "auth", "token": None})
                    await ws.receive_json()
                    await ws.send_json({"type": "filter", "filter": {}, "backfill": False})
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            message = await ws.receive(timeout=0.5)
                            if message.type != aiohttp.WSMsgType.TEXT:
                                break
                            counted.value += 1
            scraping.cancel()

    asyncio.run(main())


def pairs(
    pool: loadgen.WorkerPool, server: servers.Server, clients: int, warmup: float, duration: float
) -> tuple[float, float]:
    """Acquire + release pairs per second on ``server`` (one measurement), and the server's CPU
    time per pair in µs (its process group, over the measured window only)."""
    shares = loadgen.split_clients(clients, len(pool.processes))
    jobs = [
        loadgen.Job("pairs", server.base_url, share, warmup, duration, 2.0, 10.0, 10_000_000)
        for share in shares
    ]
    pool.prepare(jobs, timeout=30)
    start = time.time() + 0.3
    pool.start(start)
    time.sleep(max(0.0, start + warmup - time.time()))
    cpu_before = servers.cpu_seconds(server.pids())
    time.sleep(max(0.0, start + warmup + duration - time.time()))
    cpu = servers.cpu_seconds(server.pids()) - cpu_before
    merged = loadgen.merge(pool.collect(timeout=warmup + duration + 30))
    if merged.errors:
        print(f"  {server.key}: errors {merged.errors}")
    return merged.completed / duration, cpu / max(merged.completed, 1) * 1e6


#: The variants compared: (name, settings, a watcher that scrapes, which also subscribes).
VARIANTS = (
    ("bare", {"SLOTKEEPER_METRICS_ENABLED": "false"}, False, False),
    ("metrics", {}, True, False),
    ("observed", {}, True, True),
)


def overhead(args: argparse.Namespace) -> None:
    started: dict[str, servers.Server] = {}
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    counted = ctx.Value("q", 0)
    watchers = []
    pool = loadgen.WorkerPool(args.procs)
    try:
        for name, env, _, _ in VARIANTS:
            home = Path(tempfile.mkdtemp(prefix=f"bench-obs-{name}-"))
            started[name] = servers.start_slotkeeper_prepared(name, home, None, env)
        servers.wait_healthy(list(started.values()), 60)
        for server in started.values():
            for i in range(args.clients):
                scenarios.create_limit(server, f"bench-{i}", 1000)
        for name, _, scrapes, subscribes in VARIANTS:
            if scrapes:
                watcher = ctx.Process(
                    target=watcher_main,
                    args=(started[name].base_url, subscribes, 1.0, stop, counted),
                    daemon=True,
                )
                watcher.start()
                watchers.append(watcher)
        time.sleep(1.0)
        rates: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
        costs: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
        names = [name for name, *_ in VARIANTS]
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotated each round
            for name in order:
                server = started[name]
                others = [s for s in started.values() if s is not server]
                for other in others:
                    other.pause()
                try:
                    rate, cost = pairs(pool, server, args.clients, args.warmup, args.duration)
                finally:
                    for other in others:
                        other.resume()
                rates[name].append(rate)
                costs[name].append(cost)
                print(
                    f"  round {round_ + 1} {name:9s} {rate:8.0f} pairs/s, server CPU {cost:5.0f} µs/pair",
                    flush=True,
                )
        print(
            f"\nacquire+release pairs, {args.clients} clients, SQLite, {args.rounds} rounds of "
            f"{args.warmup:g} + {args.duration:g} s (bare: metrics off; metrics: on, scraped every 1 s; "
            f"observed: the same and a websocket subscriber to every event)"
        )
        for name in names:
            throughput = [r / b for r, b in zip(rates[name], rates["bare"], strict=True)]
            efficiency = [b / c for c, b in zip(costs[name], costs["bare"], strict=True)]
            print(
                f"  {name:9s} pairs/s median {statistics.median(rates[name]):6.0f}, / bare per round "
                f"{', '.join(f'{r:.2f}' for r in throughput)}: median {statistics.median(throughput):.3f}; "
                f"server CPU/pair median {statistics.median(costs[name]):5.0f} µs, pairs per CPU-second / bare: "
                f"median {statistics.median(efficiency):.3f}"
            )
        print(f"  events received by the subscriber: {counted.value}")
    finally:
        stop.set()
        for watcher in watchers:
            watcher.join(timeout=5)
            if watcher.is_alive():
                watcher.terminate()
        pool.close()
        servers.stop_all(list(started.values()))


async def populate(url: str) -> None:
    """10,000 limits; a lease on every tenth; a queued waiter on each of the first ten full ones."""
    from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
    from slotkeeper.storage import migrate, open_storage

    await asyncio.to_thread(migrate, url)
    storage = await asyncio.to_thread(open_storage, url, pool_size=8)
    try:
        step = 500
        for start in range(0, SCRAPE_LIMITS, step):
            await asyncio.gather(
                *(storage.create_limit(LimitSpec(f"scale-{i}", 1)) for i in range(start, start + step))
            )
        held = [f"scale-{i}" for i in range(0, SCRAPE_LIMITS, 10)]
        for start in range(0, len(held), step):
            await asyncio.gather(
                *(
                    storage.acquire(AcquireRequest([name], 1, lease=LeaseSpec(3600)))
                    for name in held[start : start + step]
                )
            )
    finally:
        await storage.close()


def scrape(args: argparse.Namespace) -> None:
    backends = ["sqlite"] + ([] if servers.postgres_reachable() else ["postgres"])
    for backend in backends:
        home = Path(tempfile.mkdtemp(prefix=f"bench-scrape-{backend}-"))
        database = servers.create_database() if backend == "postgres" else None
        url = servers.postgres_url(database) if database else f"sqlite:///{home / 'slotkeeper.db'}"
        began = time.monotonic()
        asyncio.run(populate(url))
        print(
            f"\n{backend}: {SCRAPE_LIMITS} limits, {SCRAPE_LIMITS // 10} leases in {time.monotonic() - began:.0f} s"
        )
        server = servers.start_slotkeeper_prepared(f"scrape-{backend}", home, database, {})
        try:
            servers.wait_healthy([server], 60)
            waiters = [
                subprocess_wait(server.base_url, f"scale-{i}") for i in range(0, 100, 10)
            ]  # queued requests behind the held leases
            metrics = server.base_url + "/metrics"
            for _ in range(3):
                _get(metrics)
            times = sorted(_get(metrics) for _ in range(30))
            with urllib.request.urlopen(metrics, timeout=30) as answer:
                size = len(answer.read())
            print(
                f"  GET /metrics x30: median {statistics.median(times) * 1000:.1f} ms, "
                f"p90 {times[26] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms ({size / 1024:.0f} KiB)"
            )
            for waiter in waiters:
                waiter.cancel()
        finally:
            servers.stop_all([server])


class subprocess_wait:
    """A request waiting on the server in a thread of its own (cancelled by closing it)."""

    def __init__(self, base_url: str, name: str) -> None:
        import http.client
        import json
        import threading

        self.conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=60)
        body = json.dumps({"names": [name], "slots": 1, "lease_duration": 60, "wait_seconds": 50})

        def send() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                self.conn.request(
                    "POST",
                    "/api/v2/concurrency_limits/increment-with-lease",
                    body,
                    {"Content-Type": "application/json"},
                )
                self.conn.getresponse().read()

        threading.Thread(target=send, daemon=True).start()

    def cancel(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", choices=["overhead", "scrape"], help="run one part only")
    args = parser.parse_args()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.only in (None, "overhead"):
        overhead(args)
    if args.only in (None, "scrape"):
        scrape(args)


if __name__ == "__main__":
    main()
