"""Acquire + release pairs through :class:`slotkeeper.storage.Storage`, in process (no HTTP).

Separates the storage's CPU from the server's: ``--clients`` tasks (each on its own limit, as the
"pairs" scenario) loop over acquire-with-lease + release on a fresh database for ``--duration``
seconds after a warm-up, and it prints pairs/s, this process's CPU per pair and (PostgreSQL) the
CPU of the database's own backends per pair (``/proc/<pid>/stat`` of the backends serving it).

    PYTHONPATH=src .venv/bin/python benchmarks/pg_inprocess.py --backend postgres --clients 64
    PYTHONPATH=/tmp/ab-main/src .venv/bin/python benchmarks/pg_inprocess.py ...   # another tree

``--rounds`` repeats the measured window on the same database (medians are printed last).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / _TICK


async def _run(
    url: str, admin: str | None, database: str | None, args: argparse.Namespace
) -> list[dict[str, float]]:
    from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
    from slotkeeper.storage import migrate, open_storage

    await asyncio.to_thread(migrate, url)
    if args.lanes and url.startswith("postgresql"):
        from slotkeeper.storage.core import Storage
        from slotkeeper.storage.postgres import PostgresBackend

        storage = Storage(PostgresBackend(url, pool_size=8, lanes=args.lanes))
    else:
        storage = open_storage(url)
    counter = [0]
    grouped = [0, 0]  # groups, operations in them (PostgreSQL)

    def on_group(size: int) -> None:
        grouped[0] += 1
        grouped[1] += size

    groups = getattr(storage.backend, "groups", None)
    if groups is not None:
        groups.on_group = on_group
    stop = asyncio.Event()
    results: list[dict[str, float]] = []
    try:
        for i in range(args.clients):
            await storage.create_limit(LimitSpec(name=f"bench-{i}", limit=1000))

        async def client(i: int) -> None:
            request = AcquireRequest([f"bench-{i}"], 1, lease=LeaseSpec(300.0))
            while not stop.is_set():
                granted = await storage.acquire(request)
                assert granted.lease_id is not None
                await storage.release_lease(granted.lease_id)
                counter[0] += 1

        tasks = [asyncio.create_task(client(i)) for i in range(args.clients)]
        await asyncio.sleep(args.warmup)
        for _ in range(args.rounds):
            pids = await asyncio.to_thread(_backends, admin, database) if database else []
            start_groups = list(grouped)
            start_pairs, start_wall, start_cpu = counter[0], time.monotonic(), time.process_time()
            start_db = _cpu_of(pids)
            await asyncio.sleep(args.duration)
            pairs = counter[0] - start_pairs
            wall = time.monotonic() - start_wall
            cpu = time.process_time() - start_cpu
            db = _cpu_of(pids) - start_db
            row = {
                "pairs_s": pairs / wall,
                "cpu_us": cpu / max(pairs, 1) * 1e6,
                "db_us": db / max(pairs, 1) * 1e6,
                "cores": cpu / wall,
                "group": (grouped[1] - start_groups[1]) / max(grouped[0] - start_groups[0], 1),
            }
            results.append(row)
            print(
                f"pairs/s {row['pairs_s']:.0f}  slotkeeper CPU/pair {row['cpu_us']:.0f} us "
                f"({row['cores']:.2f} cores)  database CPU/pair {row['db_us']:.0f} us  "
                f"operations per group {row['group']:.1f}",
                flush=True,
            )
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await storage.close()
    return results


def _backends(admin: str | None, database: str) -> list[int]:
    import psycopg

    with psycopg.connect(admin or "", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--lanes", type=int, default=0, help="PostgreSQL: lanes of the group queue (default: the pool size)"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    admin = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database: str | None = None
    results: list[dict[str, Any]]
    if args.backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            results = asyncio.run(_run(f"sqlite:///{folder}/db.sqlite", None, None, args))
    else:
        import psycopg

        database = f"slotkeeper_inproc_{os.getpid()}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        try:
            url = f"{admin.rsplit('/', 1)[0]}/{database}"
            results = asyncio.run(_run(url, admin, database, args))
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    keys = ["pairs_s", "cpu_us", "db_us", "group"]
    print("median: " + "  ".join(f"{k} {statistics.median(r[k] for r in results):.1f}" for k in keys))


if __name__ == "__main__":
    main()
