"""The SDK against a Redis semaphore: acquire + release blocks per second from one Python process.

Usage::

    python benchmarks/sdk_vs_redis.py [--rounds 4] [--seconds 5] [--warmup 1] [--holders 64]
                                      [--variants session,http,redis,nodb-session,storage]
                                      [--form async|sync]
                                      [--backend sqlite|postgres] [--json out.json]

It starts slotkeeper (SQLite in a fresh home, or ``--backend postgres``: a fresh database;
``slotkeeper server start``, as ``benchmarks/servers.py`` starts it)
and a ``redis-server`` (no persistence, on a free loopback port; the Redis variant is skipped with
a message when ``redis-server`` is not installed), then measures each variant in turn, round
after round, the order rotating every round and the other servers frozen (SIGSTOP):

* ``session``: slotkeeper's SDK, ``async with slotkeeper.sdk.asyncio.concurrency(name)`` with
  an empty body, over its session (one websocket per process, the default);
* ``http``: the same code with ``SLOTKEEPER_SDK_PROTOCOL=http`` (a request per acquire and per
  release);
* ``redis``: a counting semaphore with leases in Redis (a sorted set per name: a Lua script
  drops expired holders and adds this one if fewer than the limit hold it, ``ZREM`` releases),
  through redis-py's asyncio client (with hiredis, as the ``bench`` extra installs it), which is
  what a user who picks Redis would write;
* ``nodb-session`` (and ``nodb-http``, only when asked): the SDK against slotkeeper's own
  application over a storage that does no database work (``benchmarks/nodb_server.py``): what
  the protocol, the server's stack and the SDK allow without the database, the floor of the
  first two variants on this machine. Never a target: it keeps no state at all.
* ``storage``: slotkeeper's storage alone, in the holders' process, on a fresh SQLite database of
  its own: ``Storage.acquire`` with a lease and ``Storage.release_lease`` called directly (no
  transport, no server, no SDK), on the stdlib loop. The durable work of a block (its two
  transactions with their events) and nothing else: no variant that goes through the server
  can beat it, so it is the floor of ``session`` set by the database (only with SQLite; with
  ``--async`` forms only).

Each measurement is a fresh process (stdlib ``asyncio.run``, as an application runs) with
``--holders`` tasks (``--form sync``: threads, ``with concurrency(...)`` and redis-py's sync
client), each on a limit (or key) of its own with room to spare, so nothing contends: the figure is the cost of an acquisition and a release, end to end. A block counts
when its release returns inside the window. It prints blocks per second, the CPU per block of
the client process and of the server, the ratios of each round and their medians, and the
command that made them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import scenarios
import servers

ROOT = Path(__file__).resolve().parent.parent
PYTHON = servers.SLOTKEEPER_VENV / "bin" / "python"
VARIANTS = ("session", "http", "redis", "nodb-session", "storage")
#: Every variant, with the ones measured only when asked.
ALL_VARIANTS = (*VARIANTS, "nodb-http")
LIMIT = 1000
LEASE_SECONDS = 300

#: The semaphore in Redis (see ``servers.REDIS_ACQUIRE_LUA``).
ACQUIRE_LUA = servers.REDIS_ACQUIRE_LUA


# --- the holders' process ---------------------------------------------------------------------


def _cpu(pids: list[int]) -> float:
    return servers.cpu_seconds(pids) if pids else 0.0


async def _holders(args: argparse.Namespace) -> dict[str, Any]:
    count = 0
    errors: dict[str, int] = {}
    stop = False

    if args.variant == "redis":
        import redis.asyncio as aioredis

        host, port = args.target.rsplit(":", 1)
        client = aioredis.Redis(host=host, port=int(port), max_connections=args.holders)
        acquire = client.register_script(ACQUIRE_LUA)

        async def block(i: int) -> None:
            key = f"bench-{i}"
            token = uuid.uuid4().hex
            if await acquire(keys=[key], args=[LIMIT, LEASE_SECONDS, token]) != 1:
                raise RuntimeError("not granted")
            await client.zrem(key, token)

    elif args.variant == "storage":
        import tempfile

        from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
        from slotkeeper.storage import migrate, open_storage

        url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-storage-')}/slotkeeper.db"
        migrate(url)
        storage = open_storage(url)
        for i in range(args.holders):
            await storage.create_limit(LimitSpec(name=f"bench-{i}", limit=LIMIT))
        requests = [
            AcquireRequest([f"bench-{i}"], 1, lease=LeaseSpec(LEASE_SECONDS, None))
            for i in range(args.holders)
        ]

        async def block(i: int) -> None:
            granted = await storage.acquire(requests[i])
            assert granted.lease_id is not None
            await storage.release_lease(granted.lease_id)

    else:
        from slotkeeper.sdk.asyncio import concurrency

        async def block(i: int) -> None:
            async with concurrency(f"bench-{i}", api_url=args.target, strict=True):
                pass

    async def holder(i: int) -> None:
        nonlocal count
        while not stop:
            try:
                await block(i)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.01)
            else:
                count += 1

    server_pids = [int(p) for p in args.server_pids.split(",") if p]
    tasks = [asyncio.create_task(holder(i)) for i in range(args.holders)]
    await asyncio.sleep(args.warmup)
    c0, t0, cpu0, s0 = count, time.perf_counter(), time.process_time(), _cpu(server_pids)
    await asyncio.sleep(args.seconds)
    c1, t1, cpu1, s1 = count, time.perf_counter(), time.process_time(), _cpu(server_pids)
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return _result(args, c1 - c0, t1 - t0, cpu1 - cpu0, s1 - s0, errors)


def _threads(args: argparse.Namespace) -> dict[str, Any]:
    """The sync form: ``--holders`` threads, ``with concurrency(...)`` or redis-py's sync client."""
    counts = [0] * args.holders
    errors: dict[str, int] = {}
    stop = threading.Event()

    if args.variant == "redis":
        import redis

        host, port = args.target.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port), max_connections=args.holders)
        acquire = client.register_script(ACQUIRE_LUA)

        def block(i: int) -> None:
            key = f"bench-{i}"
            token = uuid.uuid4().hex
            if acquire(keys=[key], args=[LIMIT, LEASE_SECONDS, token]) != 1:
                raise RuntimeError("not granted")
            client.zrem(key, token)

    else:
        from slotkeeper.sdk.sync import concurrency

        def block(i: int) -> None:
            with concurrency(f"bench-{i}", api_url=args.target, strict=True):
                pass

    def holder(i: int) -> None:
        while not stop.is_set():
            try:
                block(i)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                time.sleep(0.01)
            else:
                counts[i] += 1

    server_pids = [int(p) for p in args.server_pids.split(",") if p]
    threads = [threading.Thread(target=holder, args=(i,), daemon=True) for i in range(args.holders)]
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)
    c0, t0, cpu0, s0 = sum(counts), time.perf_counter(), time.process_time(), _cpu(server_pids)
    time.sleep(args.seconds)
    c1, t1, cpu1, s1 = sum(counts), time.perf_counter(), time.process_time(), _cpu(server_pids)
    stop.set()
    for thread in threads:
        thread.join()
    return _result(args, c1 - c0, t1 - t0, cpu1 - cpu0, s1 - s0, errors)


def _result(
    args: argparse.Namespace, blocks: int, seconds: float, cpu: float, server: float, errors: dict[str, int]
) -> dict[str, Any]:
    return {
        "variant": args.variant,
        "form": args.form,
        "blocks": blocks,
        "seconds": seconds,
        "blocks_per_second": blocks / seconds,
        "client_cpu_ms": 1000 * cpu / blocks if blocks else None,
        "server_cpu_ms": 1000 * server / blocks if blocks else None,
        "errors": errors,
    }


def holders_main(args: argparse.Namespace) -> None:
    result = asyncio.run(_holders(args)) if args.form == "async" else _threads(args)
    print(json.dumps(result), flush=True)


# --- the run ----------------------------------------------------------------------------------


def start_nodb() -> servers.Server:
    """Start ``nodb_server.py`` (slotkeeper's app with no database) on a free port."""
    home = Path(servers.tempfile.mkdtemp(prefix="bench-nodb-"))
    command = servers.uvicorn_command(
        "nodb_server:create", servers.free_port(), "--app-dir", str(Path(__file__).parent)
    )
    return servers._spawn("nodb", command, servers._clean_env(SLOTKEEPER_HOME=str(home)), home, {})


def _redis_missing() -> str | None:
    """Why the Redis variant cannot run here, or None (see ``servers.redis_missing``)."""
    return servers.redis_missing()


def start_redis() -> servers.Server | None:
    """Start ``redis-server`` (no persistence) on a free loopback port; None when not installed."""
    return None if shutil.which("redis-server") is None else servers.start_redis()


def redis_ready(server: servers.Server, timeout: float = 10.0) -> bool:
    """Wait until the Redis server answers PING; False if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if servers.redis_healthy(server, 1.0):
            return True
        time.sleep(0.05)
    return False


def measure(
    variant: str,
    target: str,
    server: servers.Server | None,
    *,
    holders: int = 64,
    warmup: float = 1.0,
    seconds: float = 5.0,
    form: str = "async",
) -> dict[str, Any]:
    """One measurement of ``variant`` against ``target`` (an API URL, or ``host:port`` for
    Redis) served by ``server`` (whose CPU is counted; None: no server, the ``storage``
    variant), in a fresh process; the figures as a
    JSON-ready dict, or ``{"failed": ...}``. What ``benchmarks/run.py`` would call per step."""
    env = dict(os.environ)
    env["SLOTKEEPER_SDK_PROTOCOL"] = "http" if variant.endswith("http") else "session"
    command = [
        str(PYTHON if PYTHON.exists() else sys.executable),
        __file__,
        "holders",
        "--variant",
        variant,
        "--target",
        target,
        "--holders",
        str(holders),
        "--warmup",
        str(warmup),
        "--seconds",
        str(seconds),
        "--server-pids",
        ",".join(str(p) for p in server.pids()) if server is not None else "",
        "--form",
        form,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"variant": variant, "failed": done.stderr.strip().splitlines()[-1:] or ["?"]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _median(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def _ratio(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0%} [{min(values):.0%}-{max(values):.0%}]"


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: choose from {', '.join(ALL_VARIANTS)}")
    command = "python benchmarks/sdk_vs_redis.py " + shlex.join(sys.argv[1:])
    print(f"[sdk-vs-redis] {command}", flush=True)
    started: list[servers.Server] = []
    notes: list[str] = []
    try:
        if args.backend == "postgres":
            problem = servers.postgres_reachable()
            if problem:
                raise SystemExit(f"--backend postgres: {problem}")
        slotkeeper = servers.start_slotkeeper(f"slotkeeper-{args.backend}")
        started.append(slotkeeper)
        missing = _redis_missing() if "redis" in variants else None
        redis = start_redis() if "redis" in variants and missing is None else None
        if redis is not None:
            started.append(redis)
        elif "redis" in variants:
            notes.append(f"{missing}: the Redis variant is skipped")
            print(f"[sdk-vs-redis] {notes[-1]}", flush=True)
            variants.remove("redis")
        nodb = start_nodb() if any(v.startswith("nodb") for v in variants) else None
        if nodb is not None:
            started.append(nodb)
        servers.wait_healthy([s for s in (slotkeeper, nodb) if s is not None], timeout=60)
        if redis is not None and not redis_ready(redis):
            raise servers.ServerError(f"redis-server did not answer:\n{redis.log_tail()}")
        for i in range(args.holders):
            scenarios.create_limit(slotkeeper, f"bench-{i}", LIMIT)
        targets = {
            "session": (slotkeeper.base_url + "/api", slotkeeper),
            "http": (slotkeeper.base_url + "/api", slotkeeper),
        }
        if redis is not None:
            targets["redis"] = (f"{servers.LOOPBACK}:{redis.port}", redis)
        if nodb is not None:
            targets["nodb-session"] = targets["nodb-http"] = (nodb.base_url + "/api", nodb)
        if "storage" in variants and args.backend != "sqlite":
            notes.append("the storage variant runs on SQLite only: skipped")
            variants.remove("storage")
        chosen: dict[str, tuple[str, servers.Server | None]] = {**targets, "storage": ("", None)}
        for server in started:
            server.pause()
        rounds: list[dict[str, dict[str, Any]]] = []
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            measured: dict[str, dict[str, Any]] = {}
            for variant in order:
                target, server = chosen[variant]
                if server is not None:
                    server.resume()
                try:
                    measured[variant] = measure(
                        variant,
                        target,
                        server,
                        holders=args.holders,
                        warmup=args.warmup,
                        seconds=args.seconds,
                        form=args.form,
                    )
                    time.sleep(0.3)  # let the server finish what the holders left
                finally:
                    if server is not None:
                        server.pause()
                shown = measured[variant]
                if "failed" in shown:
                    print(f"[sdk-vs-redis] round {rnd + 1} {variant}: FAILED {shown['failed']}", flush=True)
                else:
                    print(
                        f"[sdk-vs-redis] round {rnd + 1} {variant:8s} {shown['blocks_per_second']:8,.0f} blocks/s"
                        f"  client {shown['client_cpu_ms']:.3f} ms/block  server {shown['server_cpu_ms']:.3f} ms/block"
                        + (f"  errors {shown['errors']}" if shown["errors"] else ""),
                        flush=True,
                    )
            rounds.append(measured)
    finally:
        servers.stop_all(started)
    return _summary(command, variants, rounds, notes)


def _summary(
    command: str, variants: list[str], rounds: list[dict[str, dict[str, Any]]], notes: list[str]
) -> dict[str, Any]:
    def values(variant: str, key: str) -> list[float]:
        return [r[variant][key] for r in rounds if variant in r and r[variant].get(key) is not None]

    def ratios(a: str, b: str) -> list[float]:
        return [
            r[a]["blocks_per_second"] / r[b]["blocks_per_second"]
            for r in rounds
            if "blocks_per_second" in r.get(a, {}) and r.get(b, {}).get("blocks_per_second")
        ]

    print(f"\nBlocks per second, one process, {len(rounds)} rounds (median [min-max]):", flush=True)
    print(f"{'variant':10s} {'blocks/s':>24s} {'client ms/block':>16s} {'server ms/block':>16s}")
    for variant in variants:
        client = values(variant, "client_cpu_ms")
        server = values(variant, "server_cpu_ms")
        print(
            f"{variant:10s} {_median(values(variant, 'blocks_per_second')):>24s}"
            f" {statistics.median(client) if client else float('nan'):16.3f}"
            f" {statistics.median(server) if server else float('nan'):16.3f}"
        )
    pairs = [
        ("session", "redis"),
        ("http", "redis"),
        ("session", "http"),
        ("nodb-session", "redis"),
        ("storage", "redis"),
        ("session", "storage"),
    ]
    summary_ratios = {f"{a}/{b}": ratios(a, b) for a, b in pairs if a in variants and b in variants}
    for name, found in summary_ratios.items():
        print(f"ratio {name}: {_ratio(found)}")
    for note in notes:
        print(f"note: {note}")
    print(f"command: {command}", flush=True)
    return {"command": command, "rounds": rounds, "ratios": summary_ratios, "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what")
    holders = sub.add_parser("holders", help="(internal) one measurement, in its own process")
    holders.add_argument("--variant", required=True)
    holders.add_argument("--target", required=True)
    holders.add_argument("--holders", type=int, default=64)
    holders.add_argument("--warmup", type=float, default=1.0)
    holders.add_argument("--seconds", type=float, default=5.0)
    holders.add_argument("--server-pids", default="")
    holders.add_argument("--form", choices=("async", "sync"), default="async")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--holders", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--form",
        choices=("async", "sync"),
        default="async",
        help="async: tasks on one event loop (redis-py's asyncio client); sync: threads (its sync client)",
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="slotkeeper's database (postgres: a fresh database on BENCH_POSTGRES_URL's server)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.what == "holders":
        holders_main(args)
        return
    results = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
