"""Prefect's own ``concurrency()`` client against a server: run by ``run.py`` in ``.venv-prefect``.

Usage (``PREFECT_API_URL`` names the server)::

    .venv-prefect/bin/python benchmarks/prefect_client.py --warm NAME --run NAME:LIMIT [--run ...]
        [--tasks 16] [--blocks 5] [--hold 0.01] [--timeout 30]

For each ``--run``, ``tasks`` asyncio tasks each enter ``blocks`` times
``prefect.concurrency.asyncio.concurrency(NAME, occupy=1, strict=True)`` and hold it ``hold``
seconds. Before the runs one block on ``--warm`` opens the client (HTTP connection, version
check, events worker), so its start-up cost is not counted. Each run reports its wall time and
the CPU time of this whole process (``time.process_time()``: every thread, so the client's
event loop thread and events worker too) between its start and its end, the blocks completed
(a run is cut off after ``timeout`` seconds), the most blocks seen inside at once (it must
never exceed the limit) and the first errors. The result is one JSON line on stdout.

It imports nothing from the harness: ``.venv-prefect`` has Prefect but not slotkeeper.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from typing import Any


async def _one_run(
    concurrency: Any, name: str, limit: int, tasks: int, blocks: int, hold: float, timeout: float
) -> dict[str, Any]:
    inside = 0
    most_inside = 0
    done = 0
    errors: list[str] = []

    async def task() -> None:
        nonlocal inside, most_inside, done
        for _ in range(blocks):
            try:
                async with concurrency(name, occupy=1, strict=True, timeout_seconds=timeout):
                    inside += 1
                    most_inside = max(most_inside, inside)
                    try:
                        await asyncio.sleep(hold)
                    finally:
                        inside -= 1
                done += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if len(errors) < 5:
                    errors.append(repr(exc)[:300])

    cpu0, wall0 = time.process_time(), time.perf_counter()
    workers = [asyncio.create_task(task()) for _ in range(tasks)]
    _, pending = await asyncio.wait(workers, timeout=timeout)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    for w in pending:
        w.cancel()
    # Prefect's cancellation path may wait on its service: bounded (by half the cut-off in short
    # runs, where 5 s would double the run), then left behind.
    if pending:
        await asyncio.wait(pending, timeout=min(5.0, timeout / 2))
    return {
        "name": name,
        "limit": limit,
        "tasks": tasks,
        "blocks_per_task": blocks,
        "hold_s": hold,
        "blocks": tasks * blocks,
        "completed": done,
        "finished": not pending,
        "wall_s": wall,
        "cpu_s": cpu,
        "most_inside": most_inside,
        "errors": errors,
        "timeout_s": timeout,
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    concurrency = importlib.import_module("prefect.concurrency.asyncio").concurrency
    imported = time.perf_counter() - t0
    warm0 = time.perf_counter()
    async with concurrency(args.warm, occupy=1, strict=True, timeout_seconds=args.timeout):
        pass
    warmed = time.perf_counter() - warm0
    runs = []
    for spec in args.run:
        name, _, limit = spec.rpartition(":")
        runs.append(
            await _one_run(concurrency, name, int(limit), args.tasks, args.blocks, args.hold, args.timeout)
        )
    version = importlib.import_module("prefect").__version__
    return {"prefect": version, "import_s": imported, "warm_s": warmed, "runs": runs}


def main() -> None:
    """Entry point: print one JSON line with the results, then exit at once."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warm", required=True, help="a limit for the one warm-up block")
    p.add_argument("--run", action="append", required=True, help="NAME:LIMIT, one timed run each")
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--hold", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds after which a run is cut off")
    args = p.parse_args()
    result = asyncio.run(_main(args))
    print(json.dumps(result), flush=True)
    # Skip Prefect's exit hooks: its acquisition service drains the acquisitions of cut-off
    # runs first, each sleeping Retry-After, which can take minutes. Nothing is left to save.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
