"""What an open dashboard costs the core figure: acquire + release pairs per second with nobody
watching, against the same with a dashboard open on the busiest limits, in alternation.

Usage::

    python benchmarks/dashboard.py [--clients 64] [--window 10] [--rounds 3] [--server slotkeeper-sqlite]

One server (SQLite by default, ``slotkeeper-postgres`` for PostgreSQL) with limits ``bench-0`` ..
``bench-63``; the ``pairs`` load (each client acquires and releases its own limit) from the
load generator's worker processes. "Watched" rounds open what the dashboard's two pages open:
the live overview of the first page (50 limits, every one of them busy) and the live page of
``bench-0`` (its state and every one of its events), read by a thread of this process that
counts what arrives. The order alternates every round; the figure printed is the ratio of the
medians, with each round's numbers and the command line that made them.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import statistics
import sys
import threading
from pathlib import Path
from types import FrameType

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import scenarios, servers
from benchmarks.loadgen import WorkerPool
from benchmarks.observability import pairs as measure

LIMITS = 64
PROCS = 2
STREAMS = ("/api/live/limits?limit=50", "/api/live/limits/bench-0?backfill=0")


class Dashboard:
    """The two live streams of a dashboard, read on a thread until stopped: bytes and messages."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.messages = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)

    async def _one(self, session: aiohttp.ClientSession, path: str) -> None:
        while not self._stop.is_set():  # a stream ends after a minute: open it again, as a browser
            async with session.get(self.base_url + path) as response:
                async for line in response.content:
                    self.bytes += len(line)
                    self.messages += line.startswith(b"event:")
                    if self._stop.is_set():
                        return

    async def _read(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            tasks = [asyncio.create_task(self._one(session, p)) for p in STREAMS]
            while not self._stop.is_set():
                await asyncio.sleep(0.1)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Dashboard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the server and the workers are stopped on the way out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--server", default="slotkeeper-sqlite", choices=["slotkeeper-sqlite", "slotkeeper-postgres"]
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)

    server = servers.start_slotkeeper(args.server)
    pool = WorkerPool(PROCS)
    pairs: dict[str, list[float]] = {"alone": [], "watched": []}
    cpu: dict[str, list[float]] = {"alone": [], "watched": []}
    messages: list[int] = []
    try:
        servers.wait_healthy([server], timeout=60)
        for i in range(LIMITS):
            scenarios.create_limit(server, f"bench-{i}", 1)
        for rnd in range(args.rounds):
            for variant in ["alone", "watched"] if rnd % 2 == 0 else ["watched", "alone"]:
                if variant == "alone":
                    rate, per_pair = measure(pool, server, args.clients, 1.0, args.window)
                else:
                    with Dashboard(server.base_url) as dashboard:
                        rate, per_pair = measure(pool, server, args.clients, 1.0, args.window)
                    messages.append(dashboard.messages)
                pairs[variant].append(rate)
                cpu[variant].append(per_pair)
                print(
                    f"round {rnd + 1} {variant:8s} {rate:8.0f} pairs/s {per_pair:6.0f} µs server CPU/pair",
                    flush=True,
                )
    finally:
        pool.close()
        servers.stop_all([server])
    alone, seen = statistics.median(pairs["alone"]), statistics.median(pairs["watched"])
    cpu_alone, cpu_seen = statistics.median(cpu["alone"]), statistics.median(cpu["watched"])
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    print(f"server: {args.server}, {args.clients} clients, {args.window:g} s windows, {args.rounds} rounds")
    print(f"median pairs/s: alone {alone:.0f}, with a dashboard open {seen:.0f}: {seen / alone:.1%} of alone")
    print(f"median server CPU per pair: alone {cpu_alone:.0f} µs, with a dashboard open {cpu_seen:.0f} µs")
    print(f"the dashboard received a median of {statistics.median(messages):.0f} messages per window")


if __name__ == "__main__":
    main()
