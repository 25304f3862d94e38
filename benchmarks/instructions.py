"""Instructions per acquire + release pair, in process: a deterministic A/B of the storage code.

On a shared machine, times and even CPU seconds move with the other load; the number of
instructions a process executes does not (much). This runs ``pairs`` acquire-with-lease +
release pairs through :class:`slotkeeper.storage.Storage` (16 clients, each on its own limit, as
the "pairs" scenario does over HTTP) under ``valgrind --tool=callgrind`` twice, with ``pairs``
and ``3 * pairs`` pairs, and prints the difference per pair: what one pair costs, start-up and
set-up excluded. PostgreSQL's own work (another process) is not counted.

    .venv/bin/python benchmarks/instructions.py --backend sqlite                 # this tree
    .venv/bin/python benchmarks/instructions.py --backend sqlite --src /tmp/ab-main/src  # another

The A/B of docs/benchmarks.md ("Storage split") ran both, alternated, in one session.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLIENTS = 16


async def _pairs(url: str, pairs: int) -> None:
    from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
    from slotkeeper.storage import migrate, open_storage

    await asyncio.to_thread(migrate, url)
    storage = open_storage(url)
    try:
        for i in range(CLIENTS):
            await storage.create_limit(LimitSpec(name=f"bench-{i}", limit=1000))

        async def client(i: int, count: int) -> None:
            request = AcquireRequest([f"bench-{i}"], 1, lease=LeaseSpec(300.0))
            for _ in range(count):
                granted = await storage.acquire(request)
                assert granted.lease_id is not None
                await storage.release_lease(granted.lease_id)

        await asyncio.gather(*(client(i, pairs // CLIENTS) for i in range(CLIENTS)))
    finally:
        await storage.close()


def _database(backend: str, folder: str) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite:///{folder}/db.sqlite", None
    import psycopg

    admin = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"slotkeeper_instr_{os.getpid()}_{len(os.listdir(folder))}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{admin.rsplit('/', 1)[0]}/{name}", name


def _drop(database: str | None) -> None:
    if database is None:
        return
    import psycopg

    admin = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _instructions(backend: str, pairs: int, src: str | None) -> int:
    """Instructions of one child process running ``pairs`` pairs on a fresh database."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as folder:
        url, database = _database(backend, folder)
        try:
            done = subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={folder}/callgrind.out",
                    sys.executable,
                    __file__,
                    "_child",
                    url,
                    str(pairs),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            _drop(database)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:
        asyncio.run(_pairs(argv[1], int(argv[2])))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--pairs", type=int, default=320, help="pairs of the shorter run (default: 320)")
    p.add_argument("--src", help="a src folder whose slotkeeper to measure (default: this tree)")
    args = p.parse_args(argv)
    short = _instructions(args.backend, args.pairs, args.src)
    long = _instructions(args.backend, 3 * args.pairs, args.src)
    per_pair = (long - short) / (2 * args.pairs)
    print(f"{args.backend} src={args.src or 'this tree'}: {per_pair:,.0f} instructions per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
