"""A/B of the core benchmark: two slotkeeper servers, measured in turn, in one run.

Both sides serve the "pairs" scenario of ``benchmarks/run`` (each client acquires 1 slot with a
lease on its own limit, then releases it; see docs/benchmarks.md) on the same backend. A side is
the code it runs (``--a-src``/``--b-src``: a ``src`` folder put first on ``PYTHONPATH``; default:
this tree) and its settings (``--a-env``/``--b-env KEY=VALUE``). Rounds alternate the order
(A B, B A, A B, ...) and the side not measured is frozen (SIGSTOP), so the machine's drift and
the other load hit both alike; what to compare is the ratio B/A round by round, not the
absolute figures (this machine is shared).

Two uses, both documented with their figures in docs/benchmarks.md:

    # the hot path against FastAPI's own stack (SLOTKEEPER_HOT_PATH, docs/configuration.md)
    .venv/bin/python benchmarks/ab.py --a-label hot-path --b-label fastapi --b-env SLOTKEEPER_HOT_PATH=false

    # another commit's code against this tree's
    git archive main src | tar -x -C /tmp/ab-main
    .venv/bin/python benchmarks/ab.py --a-label main --a-src /tmp/ab-main/src --b-label branch
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import scenarios
import servers
from loadgen import WorkerPool


def _env(pairs: list[str], src: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--*-env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    return env


def _start(label: str, backend: str, env: dict[str, str]) -> servers.Server:
    home = Path(tempfile.mkdtemp(prefix=f"bench-ab-{label}-"))
    database = servers.create_database() if backend == "postgres" else None
    server = servers.start_slotkeeper_prepared(f"{label} ({backend})", home, database, env)
    servers.wait_healthy([server], timeout=60)
    for i in range(64):
        scenarios.create_limit(server, f"bench-{i}", 1000)
    return server


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients, at most 64 (default: 64)")
    p.add_argument("--rounds", type=int, default=6, help="measurements per side (default: 6)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window (default: 1)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per window (default: 5)")
    for side in ("a", "b"):
        p.add_argument(f"--{side}-label", default=side.upper())
        p.add_argument(
            f"--{side}-src", help="a src folder whose slotkeeper this side runs (default: this tree)"
        )
        p.add_argument(f"--{side}-env", action="append", default=[], help="KEY=VALUE setting (repeatable)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64:
        p.error("--clients must be between 1 and 64")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.backend == "postgres" and (problem := servers.postgres_reachable()):
        raise SystemExit(f"PostgreSQL: {problem}")
    sides = [
        (args.a_label, _env(args.a_env, args.a_src)),
        (args.b_label, _env(args.b_env, args.b_src)),
    ]
    began = time.monotonic()
    pool = WorkerPool(max(1, os.cpu_count() or 1))
    started: list[servers.Server] = []
    rates: dict[str, list[float]] = {label: [] for label, _ in sides}
    cpu: dict[str, list[float]] = {label: [] for label, _ in sides}
    p99: dict[str, list[float]] = {label: [] for label, _ in sides}
    errors: dict[str, int] = {label: 0 for label, _ in sides}
    try:
        for label, env in sides:
            started.append(_start(label, args.backend, env))
        by_label = {label: server for (label, _), server in zip(sides, started, strict=True)}
        ctx = scenarios.Context(
            pool=pool,
            servers={s.key: s for s in started},
            extra=scenarios.EXTRA["short"],
            pause=True,
            settle_max=3.0,
            began=began,
        )
        for server in started:
            server.pause()
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for label, _ in order:
                server = by_label[label]
                with scenarios.active(ctx, server):
                    jobs = scenarios.spread_jobs(
                        "pairs", ctx, server, args.clients, args.warmup, args.duration, 2.0, {}
                    )
                    window = scenarios.run_jobs(ctx, server, jobs, args.warmup, args.duration)
                merged = window.merged
                rate = merged.completed / args.duration
                rates[label].append(rate)
                cpu[label].append(window.cpu["server_cores"] / max(rate, 1e-9) * 1e6)
                latency = sorted(merged.latencies)
                p99[label].append(latency[int(0.99 * (len(latency) - 1))] * 1000 if latency else float("nan"))
                errors[label] += sum(merged.errors.values())
                ctx.log(
                    f"round {rnd + 1} {label}: {rate:,.0f} pairs/s, server CPU "
                    f"{cpu[label][-1]:,.0f} us/pair, acquire p99 {p99[label][-1]:.1f} ms"
                )
    finally:
        pool.close()
        servers.stop_all(started)
    _print(args, sides, rates, cpu, p99, errors, argv)
    return 0


def _print(
    args: argparse.Namespace,
    sides: list[tuple[str, dict[str, str]]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
    p99: dict[str, list[float]],
    errors: dict[str, int],
    argv: list[str],
) -> None:
    (a, _), (b, _) = sides
    ratios = [rb / ra for ra, rb in zip(rates[a], rates[b], strict=True) if ra]
    cpu_ratios = [cb / ca for ca, cb in zip(cpu[a], cpu[b], strict=True) if ca]
    print()
    print(f"command: .venv/bin/python benchmarks/ab.py {shlex.join(argv)}")
    print(f"{args.backend}, {args.clients} clients, {args.rounds} rounds of {args.duration:g} s per side")
    print("| side | pairs/s (median) | server CPU us/pair (median) | acquire p99 ms (median) | errors |")
    print("|---|---:|---:|---:|---:|")
    for label, _ in sides:
        print(
            f"| {label} | {statistics.median(rates[label]):,.0f} | {statistics.median(cpu[label]):,.0f} "
            f"| {statistics.median(p99[label]):.1f} | {errors[label]} |"
        )
    summary: dict[str, Any] = {
        "pairs/s B/A per round": [round(r, 3) for r in ratios],
        "median": round(statistics.median(ratios), 3) if ratios else None,
        "CPU per pair B/A median": round(statistics.median(cpu_ratios), 3) if cpu_ratios else None,
    }
    print(f"{b} / {a}: {summary}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
