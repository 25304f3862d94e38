"""PostgreSQL against SQLite, and one server process against two on one database (issue 14, items
1 and 4).

Two parts, both in ``benchmarks/run`` (docs/benchmarks.md, "PostgreSQL"):

* :func:`postgres_vs_sqlite` reads the "pairs" measurements of the run (both backends, measured in
  alternation, so side by side): PostgreSQL's pairs/s as a share of SQLite's at 16 and 64
  clients, the server CPU per pair of each, and whether PostgreSQL's throughput holds from 16 to
  64 clients.
* The scenario ``procs`` (:func:`measure_procs`, one step per round): two slotkeeper processes on
  one fresh PostgreSQL database, 64 clients doing acquire + release pairs, each on its own
  limit; first (or second: the order alternates by round) one process takes every client while
  the other is frozen (SIGSTOP), then both serve half of the clients each (load-generator worker
  *i* talks to process *i* mod 2). For each: pairs/s, slotkeeper's CPU per pair (both processes)
  and PostgreSQL's (the backends serving that database), the figures the paragraph on N
  processes on N machines is computed from.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import scenarios
import servers
from scenarios import Context, run_jobs

KEY = "slotkeeper-postgres"
#: What item 1 asks: PostgreSQL's pairs/s at least this share of SQLite's, at this many clients.
SHARE_TARGET = 0.5
CPU_RATIO_TARGET = 2.0
TARGET_CLIENTS = 64
#: Clients of the one-against-two-processes comparison.
PROCS_CLIENTS = 64
LIMITS = 64


# --- item 1: PostgreSQL against SQLite, from the pairs measurements ------------------------------


def _per_pair_us(m: dict[str, Any]) -> float | None:
    return m["cpu"]["server_cores"] / m["rate"] * 1e6 if m.get("rate") else None


def postgres_vs_sqlite(measurements: list[dict[str, Any]]) -> dict[str, Any] | None:
    """PostgreSQL / SQLite per client count, round by round (the two were measured minutes apart
    at most, in alternation), then the median across rounds; None without both backends."""
    rates: dict[tuple[str, int, int], dict[str, Any]] = {
        (m["target"], m["clients"], m["round"]): m for m in measurements if m["scenario"] == "pairs"
    }
    rows = []
    for clients in sorted({c for t, c, _ in rates if t == KEY}):
        shares, cpu_ratios, pg_cpu, lite_cpu, pg_rate, lite_rate = [], [], [], [], [], []
        for (target, c, rnd), pg in rates.items():
            lite = rates.get(("slotkeeper-sqlite", clients, rnd))
            if target != KEY or c != clients or lite is None or not lite["rate"]:
                continue
            shares.append(pg["rate"] / lite["rate"])
            pg_rate.append(pg["rate"])
            lite_rate.append(lite["rate"])
            a, b = _per_pair_us(pg), _per_pair_us(lite)
            if a is not None and b:
                pg_cpu.append(a)
                lite_cpu.append(b)
                cpu_ratios.append(a / b)
        if shares:
            rows.append(
                {
                    "clients": clients,
                    "rounds": len(shares),
                    "postgres_pairs": statistics.median(pg_rate),
                    "sqlite_pairs": statistics.median(lite_rate),
                    "share": statistics.median(shares),
                    "share_min": min(shares),
                    "postgres_cpu_us": statistics.median(pg_cpu) if pg_cpu else None,
                    "sqlite_cpu_us": statistics.median(lite_cpu) if lite_cpu else None,
                    "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
                }
            )
    if not rows:
        return None
    by = {r["clients"]: r for r in rows}
    holds = None
    if 16 in by and 64 in by:
        holds = by[64]["postgres_pairs"] >= by[16]["postgres_pairs"]
    target = by.get(TARGET_CLIENTS)
    return {
        "rows": rows,
        "share_ok": target is not None and target["share"] >= SHARE_TARGET,
        "cpu_ok": target is not None
        and target["cpu_ratio"] is not None
        and target["cpu_ratio"] <= CPU_RATIO_TARGET,
        "holds_16_to_64": holds,
    }


# --- item 4: one process against two, on one database --------------------------------------------


@dataclass
class _Both:
    """The two processes as one target of :func:`scenarios.run_jobs` (it reads their pids)."""

    members: list[servers.Server]

    def pids(self) -> list[int]:
        return [pid for s in self.members for pid in s.pids()]


def _postgres_pids(database: str) -> list[int]:
    """The PostgreSQL backends serving ``database`` now (the servers' pools and listeners)."""
    import psycopg

    with psycopg.connect(servers.POSTGRES_ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
        ).fetchall()
    return [r[0] for r in rows]


class _CpuSampler:
    """CPU seconds of the PostgreSQL backends serving one database, between two instants taken
    on timers set to the load generator's window (the backends open as the load arrives)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.start: dict[int, float] = {}
        self.t0 = self.t1 = 0.0
        self.cores = 0.0

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.start = {pid: servers.cpu_seconds([pid]) for pid in _postgres_pids(self.database)}

    def end(self) -> None:
        self.t1 = time.monotonic()
        used = sum(servers.cpu_seconds([pid]) - c for pid, c in self.start.items())
        self.cores = used / max(1e-9, self.t1 - self.t0)


def _window(
    ctx: Context, members: list[servers.Server], database: str, rnd: int, clients: int
) -> dict[str, Any]:
    """``clients`` clients doing pairs against ``members`` (worker i on member i mod n)."""
    x = ctx.extra
    warmup, duration = x.procs_warmup, x.procs_duration
    jobs = scenarios.spread_jobs("pairs", ctx, members[0], clients, warmup, duration, 2.0, {})
    jobs = [replace(job, base_url=members[i % len(members)].base_url) for i, job in enumerate(jobs)]
    sampler = _CpuSampler(database)
    # run_jobs starts the window about 0.05 s after preparing the workers (well under a second).
    timers = [threading.Timer(warmup + 0.3, sampler.begin), threading.Timer(warmup + duration, sampler.end)]
    for timer in timers:
        timer.start()
    try:
        w = run_jobs(ctx, _Both(members), jobs, warmup, duration)
    finally:
        for timer in timers:
            timer.join()
    rate = w.merged.completed / duration
    return {
        "scenario": "procs",
        "target": KEY,
        "variant": f"{len(members)} process" + ("es" if len(members) > 1 else ""),
        "processes": len(members),
        "round": rnd,
        "clients": clients,
        "pairs_per_s": rate,
        "server_cpu_us_per_pair": w.cpu["server_cores"] / rate * 1e6 if rate else None,
        "postgres_cpu_us_per_pair": sampler.cores / rate * 1e6 if rate else None,
        "acquire_ms": scenarios.pct(w.merged.latencies),
        "errors": w.merged.errors,
        "cpu": w.cpu,
    }


#: The floor's connections: as many as a slotkeeper process's pool (SLOTKEEPER_POOL_SIZE).
FLOOR_CONNECTIONS = 8


def measure_floor(database: str, rnd: int, duration: float) -> dict[str, Any]:
    """PostgreSQL's own floor for a pair, in the same run: ``FLOOR_CONNECTIONS`` threads of this
    process, each on its own connection and row, loop over the least a pair asks of the
    database: two transactions (acquire, release), each a row lock read then a write and a
    COMMIT (two round trips and one fsync), in psycopg's pipeline mode, no Python around them.
    Also the median round trip of ``SELECT 1`` and of one such transaction."""
    import psycopg

    url = servers.postgres_url(database)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS floor_rows (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute(
            "INSERT INTO floor_rows SELECT g, 0 FROM generate_series(0, %s) g ON CONFLICT DO NOTHING",
            (FLOOR_CONNECTIONS,),
        )
    stop = threading.Event()
    pairs = [0] * FLOOR_CONNECTIONS
    trips: list[list[float]] = [[] for _ in range(FLOOR_CONNECTIONS)]
    txs: list[list[float]] = [[] for _ in range(FLOOR_CONNECTIONS)]

    def one(i: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            while not stop.is_set():
                t0 = time.perf_counter()
                cur.execute(b"SELECT 1", prepare=False)
                cur.fetchone()
                trips[i].append(time.perf_counter() - t0)
                for _ in range(2):  # acquire, release
                    t0 = time.perf_counter()
                    with conn.pipeline() as pipe:
                        cur.execute(b"BEGIN", prepare=False)
                        cur.execute("SELECT n FROM floor_rows WHERE id = %s FOR UPDATE", (i,))
                        cur.fetchone()
                        cur.execute("UPDATE floor_rows SET n = n + 1 WHERE id = %s", (i,))
                        cur.execute(b"COMMIT", prepare=False)
                        pipe.sync()
                    txs[i].append(time.perf_counter() - t0)
                pairs[i] += 1

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(FLOOR_CONNECTIONS)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # connected
    before, t0 = sum(pairs), time.monotonic()
    time.sleep(duration)
    done, t1 = sum(pairs) - before, time.monotonic()
    stop.set()
    for t in threads:
        t.join(10)
    return {
        "scenario": "procs",
        "target": KEY,
        "variant": "floor",
        "processes": 0,
        "round": rnd,
        "connections": FLOOR_CONNECTIONS,
        "pairs_per_s": done / (t1 - t0),
        "round_trip_ms": statistics.median(x for ts in trips for x in ts) * 1000,
        "transaction_ms": statistics.median(x for ts in txs for x in ts) * 1000,
    }


def measure_procs(ctx: Context, rnd: int) -> list[dict[str, Any]]:
    """Start two processes on one fresh database, measure one then two (or two then one:
    alternating by round), stop them."""
    if len(ctx.pool.pids) < 2:
        return [
            {"scenario": "procs", "target": KEY, "round": rnd, "failed": "needs 2 load-generator workers"}
        ]
    database = servers.create_database()
    homes = [Path(tempfile.mkdtemp(prefix=f"bench-procs-{i}-")) for i in range(2)]
    members: list[servers.Server] = []
    out: list[dict[str, Any]] = []
    try:
        for i, home in enumerate(homes):
            members.append(servers.start_slotkeeper_prepared(f"{KEY} #{i + 1}", home, database, {}))
        servers.wait_healthy(members, timeout=120)
        for i in range(LIMITS):
            scenarios.create_limit(members[0], f"bench-{i}", 1000)
        orders = [[members[0]], members] if rnd % 2 else [members, [members[0]]]
        with ctx.quiet():
            for active in orders:
                frozen = [s for s in members if s not in active]
                for s in frozen:
                    s.pause()
                try:
                    m = _window(ctx, active, database, rnd, PROCS_CLIENTS)
                finally:
                    for s in frozen:
                        s.resume()
                out.append(m)
                ctx.log(progress(m))
                for s in members:
                    scenarios.settle(s, ctx.settle_max)
            for s in members:
                s.pause()
            try:
                floor = measure_floor(database, rnd, ctx.extra.procs_duration)
            finally:
                for s in members:
                    s.resume()
            out.append(floor)
            ctx.log(progress(floor))
    except Exception as exc:
        out.append({"scenario": "procs", "target": KEY, "round": rnd, "failed": repr(exc)[:500]})
    finally:
        servers.stop_all(members)  # drops the database (each names it; dropping twice is harmless)
        if not members:
            servers.drop_database(database)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    return out


def progress(m: dict[str, Any]) -> str:
    """One log line of a procs measurement."""
    if m.get("failed"):
        return f"round {m['round']} procs {m['target']} failed: {m['failed']}"
    if m["variant"] == "floor":
        return (
            f"round {m['round']} procs  floor: {m['pairs_per_s']:8.0f} pairs/s ({m['connections']} connections), "
            f"round trip {m['round_trip_ms']:.2f} ms, transaction {m['transaction_ms']:.2f} ms"
        )
    return (
        f"round {m['round']} procs  c={m['clients']:<3} {m['variant']:12} {m['pairs_per_s']:8.0f} pairs/s "
        f"server CPU {m['server_cpu_us_per_pair'] or 0:,.0f} us/pair, PostgreSQL {m['postgres_cpu_us_per_pair'] or 0:,.0f} us/pair"
    )


def summarize_procs(measurements: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians per number of processes, and two / one round by round."""
    ok = [m for m in measurements if m["scenario"] == "procs" and not m.get("failed")]
    floors = [m for m in ok if m["variant"] == "floor"]
    ok = [m for m in ok if m["variant"] != "floor"]
    if not ok:
        return None
    cells = []
    for n in sorted({m["processes"] for m in ok}):
        ms = [m for m in ok if m["processes"] == n]
        cells.append(
            {
                "processes": n,
                "rounds": len(ms),
                "pairs": statistics.median(m["pairs_per_s"] for m in ms),
                "server_cpu_us": statistics.median(m["server_cpu_us_per_pair"] for m in ms),
                "postgres_cpu_us": statistics.median(m["postgres_cpu_us_per_pair"] for m in ms),
                "p99_ms": statistics.median(m["acquire_ms"]["p99"] or 0 for m in ms),
                "errors": sum(sum(m["errors"].values()) for m in ms),
            }
        )
    by_round: dict[int, dict[int, float]] = {}
    for m in ok:
        by_round.setdefault(m["round"], {})[m["processes"]] = m["pairs_per_s"]
    ratios = [r[2] / r[1] for r in by_round.values() if r.get(1) and 2 in r]
    return {
        "cells": cells,
        "two_over_one": statistics.median(ratios) if ratios else None,
        "per_round": ratios,
        "floor": {
            "pairs": statistics.median(m["pairs_per_s"] for m in floors),
            "round_trip_ms": statistics.median(m["round_trip_ms"] for m in floors),
            "transaction_ms": statistics.median(m["transaction_ms"] for m in floors),
            "connections": floors[0]["connections"],
        }
        if floors
        else None,
        "failed": [m["failed"] for m in measurements if m["scenario"] == "procs" and m.get("failed")],
    }


# --- the report ---------------------------------------------------------------------------------


def _n(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render(item1: dict[str, Any] | None, item4: dict[str, Any] | None, cores: int) -> list[str]:
    """The "PostgreSQL" section of the generated report."""
    if item1 is None and item4 is None:
        return []
    lines = ["", "### PostgreSQL: against SQLite, and one process against two", ""]
    if item1 is not None:
        lines += [
            "From the pairs measurements above (the two backends measured in alternation, round by "
            "round). *Share* is PostgreSQL's pairs/s over SQLite's in the same round (median across "
            "rounds); CPU is slotkeeper's process only (PostgreSQL's own is in the table below).",
            "",
            "| clients | SQLite pairs/s | PostgreSQL pairs/s | share (worst round) | server CPU per pair SQLite / PostgreSQL | ratio |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in item1["rows"]:
            lines.append(
                f"| {r['clients']} | {_n(r['sqlite_pairs'])} | {_n(r['postgres_pairs'])} | "
                f"{r['share'] * 100:.0f} % ({r['share_min'] * 100:.0f} %) | "
                f"{_n(r['sqlite_cpu_us'])} / {_n(r['postgres_cpu_us'])} µs | {_n(r['cpu_ratio'], 2)}x |"
            )
        holds = item1["holds_16_to_64"]
        lines += [
            "",
            f"Targets (issue 14, item 1): share at {TARGET_CLIENTS} clients ≥ {SHARE_TARGET * 100:.0f} %: "
            f"**{'met' if item1['share_ok'] else 'not met'}**; CPU per pair ≤ {CPU_RATIO_TARGET:g} x SQLite's: "
            f"**{'met' if item1['cpu_ok'] else 'not met'}**; pairs/s from 16 to 64 clients does not fall: "
            f"**{'-' if holds is None else 'met' if holds else 'not met'}**.",
        ]
    if item4 is not None:
        lines += [
            "",
            f"One and two slotkeeper processes on one PostgreSQL database ({PROCS_CLIENTS} clients, "
            "`benchmarks/procs.py`; with two, each load-generator worker talks to one process). "
            f"All of it on this {cores}-core machine: the load generator, PostgreSQL and the servers share it.",
            "",
            "| processes | pairs/s | slotkeeper CPU per pair | PostgreSQL CPU per pair | p99 acquire | errors |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for c in item4["cells"]:
            lines.append(
                f"| {c['processes']} | {_n(c['pairs'])} | {_n(c['server_cpu_us'])} µs | "
                f"{_n(c['postgres_cpu_us'])} µs | {_n(c['p99_ms'], 1)} ms | {c['errors']} |"
            )
        floor = item4.get("floor")
        if floor is not None:
            lines += [
                "",
                f"PostgreSQL's own floor in the same rounds (the servers frozen): {floor['connections']} "
                "connections looping over the least a pair asks of the database (two transactions, each a "
                "row lock read, a write and a COMMIT, pipelined; no Python around them) reach "
                f"**{_n(floor['pairs'])} pairs/s**; a round trip (`SELECT 1`) takes {floor['round_trip_ms']:.2f} ms "
                f"and such a transaction {floor['transaction_ms']:.2f} ms (median).",
            ]
        two = item4["two_over_one"]
        if two is not None:
            lines += ["", f"Two processes / one: {two * 100:.0f} % (median of the rounds' ratios)."]
        lines += _scaling_paragraph(item4)
        for failure in item4["failed"]:
            lines.append(f"\nA procs round failed: `{failure}`")
    return lines


def _scaling_paragraph(item4: dict[str, Any]) -> list[str]:
    """What N processes on N machines would reach, from the measured costs per pair."""
    one = next((c for c in item4["cells"] if c["processes"] == 1), None)
    if one is None or not one["server_cpu_us"] or not one["postgres_cpu_us"]:
        return []
    per_core_server = 1e6 / one["server_cpu_us"]
    per_core_db = 1e6 / one["postgres_cpu_us"]
    return [
        "",
        f"*N processes on N machines.* One core of a slotkeeper process carried about "
        f"{_n(per_core_server)} pairs/s here ({_n(one['server_cpu_us'])} µs per pair) and one core of "
        f"PostgreSQL about {_n(per_core_db)} ({_n(one['postgres_cpu_us'])} µs). Processes share nothing "
        "but the database (no lock between them outside its rows; clients on different limits never "
        f"wait for each other), so N processes on N machines of c cores reach about N x c x "
        f"{_n(per_core_server)} pairs/s, up to D x {_n(per_core_db)} for a database of D cores. Clients "
        "that share one limit serialise on its row lock whatever N.",
    ]
