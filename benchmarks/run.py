"""Benchmark slotkeeper against Prefect's server: throughput of acquire + release pairs, and more.

Usage::

    python benchmarks/run.py [--short|--full] [--servers slotkeeper-sqlite,slotkeeper-postgres,prefect-sqlite]
                             [--scenarios ...] [--out benchmarks/results/latest.json] [--no-docs] [--check]
    python benchmarks/run.py --full --plan    # the plan and its estimated duration; starts nothing
    python benchmarks/run.py --full --smoke   # the plan with every window cut short: does each step run?
    python benchmarks/run.py --from-json benchmarks/results/latest.json   # re-render the docs only

It starts every server on a free loopback port, creates the limits, then runs the plan
(``plan.py``): each scenario on each server in alternation for several rounds (the order
rotates every round; servers not being measured are frozen with SIGSTOP), the load generator's
ceiling the same way. It writes the JSON results, regenerates the generated part of
``docs/benchmarks.md`` and prints its wall time phase by phase. Every process it starts is
stopped at the end, on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import plan
import procs
import report
import report_scenarios
import scale
import scenarios
import servers

if TYPE_CHECKING:
    from loadgen import WorkerPool

ROOT = servers.ROOT
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks-pairs.png"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latest.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "bench-smoke.json"
LIMITS = 64  # bench-0 .. bench-63, one per client at most


class Interrupted(Exception):
    """SIGTERM or SIGHUP received: stop measuring, clean up, keep what was measured."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


# --- the machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def describe_machine() -> dict[str, Any]:
    """Cores, memory, CPU model and kernel of this machine."""
    return {
        "cpu_model": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "loadavg_before": _loadavg(),
    }


SLOTKEEPER_PACKAGES = (
    "slotkeeper",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "pydantic",
    "psycopg",
    "aiohttp",
)
PREFECT_PACKAGES = ("prefect", "fastapi", "starlette", "uvicorn", "pydantic", "sqlalchemy", "aiosqlite")


def _versions_here(names: tuple[str, ...]) -> dict[str, str]:
    out = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# --- talking to a server (setup only; the load goes through loadgen) --------------------------


def create_limits(server: servers.Server, count: int) -> float:
    """Create ``bench-0`` .. ``bench-{count-1}`` with limit 1000 (an existing one is fine);
    return the seconds it took."""
    began = time.monotonic()
    for i in range(count):
        scenarios.create_limit(server, f"bench-{i}", 1000)
    return time.monotonic() - began


# --- measuring --------------------------------------------------------------------------------


def measure(ctx: scenarios.Context, step: plan.Step, mode: plan.Mode) -> dict[str, Any]:
    """One "pairs" (or "health": the generator's ceiling) measurement: ``step.clients`` clients."""
    server = ctx.servers[step.target]
    # The Redis reference speaks no HTTP: its pairs go through its own client.
    kind = "redis-pairs" if server.key == "redis" else step.scenario
    with scenarios.active(ctx, server):
        jobs = scenarios.spread_jobs(
            kind, ctx, server, step.clients, mode.warmup, mode.duration, mode.grace, {}
        )
        w = scenarios.run_jobs(ctx, server, jobs, mode.warmup, mode.duration)
    merged = w.merged
    return {
        "target": server.key,
        "scenario": step.scenario,
        "clients": step.clients,
        "round": step.round,
        "duration_s": mode.duration,
        "completed": merged.completed,
        "rate": merged.completed / mode.duration,
        "latency": report.latency_summary(merged.latencies),
        "release_latency": report.latency_summary(merged.release_latencies),
        "errors": merged.errors,
        "error_total": sum(merged.errors.values()),
        "unfinished": merged.unfinished,
        "cpu": w.cpu,
        "notes": merged.notes,
    }


def _progress(m: dict[str, Any], elapsed: float) -> None:
    lat = m["latency"]
    unit = "pairs/s" if m["scenario"] == "pairs" else "req/s"
    p99 = f"{lat['p99_ms']:.1f}" if lat["p99_ms"] is not None else "-"
    extra = f" errors {m['errors']}" if m["errors"] else ""
    extra += f" unfinished {m['unfinished']}" if m["unfinished"] else ""
    print(
        f"[bench {elapsed:5.0f}s] round {m['round']} {m['scenario']:5} c={m['clients']:<3} {m['target']:20} "
        f"{m['rate']:9.1f} {unit:7} p99 {p99} ms  cpu srv {m['cpu']['server_cores']:.2f} "
        f"gen {m['cpu']['loadgen_cores']:.2f} other {m['cpu']['other_cores']:.2f}{extra}",
        flush=True,
    )
    for note in m["notes"]:
        print(f"[bench]   note: {note}", flush=True)


def run_step(ctx: scenarios.Context, step: plan.Step, mode: plan.Mode) -> list[dict[str, Any]]:
    """Measure one step of the plan; its measurements (one, or one per limit for "client")."""
    server = ctx.servers.get(step.target)
    if step.scenario in ("pairs", "health"):
        m = measure(ctx, step, mode)
        _progress(m, time.monotonic() - ctx.began)
        return [m]
    if step.scenario == "procs":
        with ctx.quiet():  # the shared servers stay frozen; it starts two of its own
            return procs.measure_procs(ctx, step.round)
    if step.scenario == "scale":
        out = [scale.measure_scale(ctx, step.target.split("-", 1)[1], step.round)]
    elif server is None:
        raise ValueError(f"{step.target} is not running")
    elif step.scenario == "handoff":
        out = [scenarios.measure_handoff(ctx, server, step.variant, step.round)]
    elif step.scenario == "sdk":
        out = [scenarios.measure_sdk(ctx, server, step.variant, step.round)]
    elif step.scenario == "client":
        out = scenarios.measure_client(ctx, server, step.round)
    elif step.scenario == "rate":
        out = [scenarios.measure_rate(ctx, server, step.round)]
    else:
        out = [scenarios.measure_events(ctx, server, step.round)]
    for m in out:
        ctx.log(report_scenarios.progress(m))
    return out


class Phases:
    """Wall seconds of each phase of the run, from ``began`` (``time.time()``) on."""

    def __init__(self, began: float) -> None:
        self.began = began
        self.seconds: dict[str, float] = {}
        #: Until the first phase: ``benchmarks/run``'s checks, Python starting, imports.
        self._current = ("launch", began)

    def enter(self, name: str) -> None:
        """End the phase running and start ``name`` (phases of one name add up)."""
        now = time.time()
        last, since = self._current
        self.seconds[last] = self.seconds.get(last, 0.0) + now - since
        self._current = (name, now)

    def total(self) -> float:
        """Seconds since the start of the run."""
        return time.time() - self.began

    def summary(self) -> str:
        """``wall time 98 s from the start to the written report (launch 0.2 s, checks 0.1 s, ...)``."""
        self.enter("end")
        parts = ", ".join(f"{name} {secs:.1f} s" for name, secs in self.seconds.items())
        return f"wall time {self.total():.0f} s from the start to the written report ({parts})"


# --- the run ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--short",
        dest="mode",
        action="store_const",
        const="short",
        help="2 rounds of short windows, every scenario (default)",
    )
    g.add_argument(
        "--full", dest="mode", action="store_const", const="full", help="3 rounds of long windows, full scale"
    )
    p.set_defaults(mode="short")
    p.add_argument(
        "--servers",
        default=",".join(servers.SERVER_KEYS),
        help=f"comma-separated, from {', '.join(servers.SERVER_KEYS)} (default: all)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(scenarios.SCENARIOS),
        help=f"comma-separated, from {', '.join(scenarios.SCENARIOS)} (default: all)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="override the number of rounds (pairs, handoff, events)")
    p.add_argument("--duration", type=float, help="override the measured seconds per pairs measurement")
    p.add_argument("--warmup", type=float, help="override the warm-up seconds per pairs measurement")
    p.add_argument("--clients", help="override the client counts, e.g. 1,16,64 (at most 64)")
    p.add_argument(
        "--procs", type=int, default=max(1, len(os.sched_getaffinity(0))), help="load-generator processes"
    )
    p.add_argument("--no-pause", dest="pause", action="store_false", help="do not freeze idle servers")
    p.add_argument("--no-docs", dest="docs", action="store_false", help="do not rewrite docs/benchmarks.md")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if slotkeeper misses a target of the scenarios run"
    )
    p.add_argument("--from-json", type=Path, help="only re-render docs/benchmarks.md from these results")
    p.add_argument(
        "--plan", action="store_true", help="print the plan and its estimated duration, start nothing"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"run the plan with every window cut short, to check that each step runs (figures "
        f"meaningless); implies --no-docs, results to {SMOKE_OUT} unless --out",
    )
    return p.parse_args(argv)


def _mode(args: argparse.Namespace) -> plan.Mode:
    mode = plan.MODES[args.mode]
    if args.smoke:
        mode = plan.smoke(mode)
    if args.rounds is not None:
        mode = replace(mode, rounds=max(1, args.rounds))
    if args.duration is not None:
        mode = replace(mode, duration=max(0.5, args.duration))
    if args.warmup is not None:
        mode = replace(mode, warmup=max(0.0, args.warmup))
    if args.clients:
        counts = tuple(int(c) for c in args.clients.split(","))
        if any(not 1 <= c <= LIMITS for c in counts):
            raise SystemExit(f"--clients: each count must be 1..{LIMITS}")
        ceiling = tuple(c for c in mode.ceiling_clients if c in counts) or (max(counts),)
        mode = replace(mode, clients=counts, ceiling_clients=ceiling)
    return mode


def _command(argv: list[str]) -> str:
    invoked = os.environ.get("BENCH_INVOKED_AS", "python benchmarks/run.py")
    return " ".join([invoked, *(shlex.quote(a) for a in argv)])


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write the results atomically (``*.tmp`` then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def publish(results: dict[str, Any], docs: bool) -> None:
    """Regenerate the plots (when matplotlib is there) and the generated part of the docs."""
    if not docs:
        return
    plot = PLOT.name if report.plot_pairs(results, PLOT) else None
    plots = report_scenarios.plot_all(results, DOCS.parent)
    scenario_lines = report_scenarios.render(results, plots, results["summary"]["cells"])
    scenario_lines += _postgres_lines(results)
    report.update_docs(DOCS, report.render(results, plot=plot, scenario_lines=scenario_lines))
    written = [p for p in ([plot] if plot else []) + list(plots.values())]
    print(
        f"[bench] wrote {DOCS.relative_to(ROOT)}"
        + (f" and docs/{', docs/'.join(written)}" if written else ""),
        flush=True,
    )


def _postgres_lines(results: dict[str, Any]) -> list[str]:
    """PostgreSQL against SQLite and one process against two (procs.py)."""
    return procs.render(
        procs.postgres_vs_sqlite(results["measurements"]),
        procs.summarize_procs(results.get("scenarios", [])),
        results["meta"]["machine"]["cores"],
    )


def _scenarios(args: argparse.Namespace) -> list[str]:
    chosen = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in scenarios.SCENARIOS]
    if unknown or not chosen:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(scenarios.SCENARIOS)}")
    return [k for k in scenarios.SCENARIOS if k in chosen]


def _start(ctx: scenarios.Context, started: list[servers.Server], count: int, meta: dict[str, Any]) -> None:
    """Wait until these servers answer, create their limits, freeze them (when pausing)."""
    if not started:
        return
    servers.wait_healthy(started, timeout=180)
    ctx.log(f"{', '.join(s.key for s in started)} healthy; creating limits")
    for server in started:
        # Redis needs no limits: a key holds its semaphore's holders.
        made = 0.0 if server.key in servers.REFERENCE_KEYS else create_limits(server, count)
        meta["setup"][server.key] = {"limits": count, "seconds": made}
        meta["servers"][server.key] = {
            "env": server.env_shown,
            "command": " ".join(shlex.quote(c) for c in server.command),
        }
        if ctx.pause:
            server.pause()


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Start the servers, measure, stop everything, write the results."""
    from loadgen import WorkerPool

    phases = Phases(float(os.environ.pop("BENCH_STARTED", "") or time.time()))
    phases.enter("checks")
    mode = _mode(args)
    chosen = _scenarios(args)
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in servers.SERVER_KEYS]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {', '.join(servers.SERVER_KEYS)}")
    if args.plan:
        for line in plan.describe(plan.build(keys, chosen, mode), mode):
            print(f"[bench] {line}")
        return 0
    if args.smoke:
        args.docs = False
        args.out = SMOKE_OUT if args.out == DEFAULT_OUT else args.out
    began = time.monotonic()
    meta: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command(argv),
        "mode": mode.name,
        **{k: v for k, v in asdict(mode).items() if k != "name"},
        "scenarios": chosen,
        "procs": args.procs,
        "pause_others": args.pause,
        "machine": describe_machine(),
        "versions": {},
        "servers": {},
        "setup": {},
        "skipped": {},
        "notes": [],
        "targets": [],
        "complete": False,
    }
    skipped: dict[str, str] = meta["skipped"]
    if "prefect-sqlite" in keys:
        meta["versions"][".venv-prefect"] = servers.ensure_prefect_venv(PREFECT_PACKAGES)
    if "slotkeeper-postgres" in keys:
        why = servers.postgres_reachable()
        if why:
            print(f"[bench] skipping slotkeeper-postgres: {why}", flush=True)
            skipped["slotkeeper-postgres"] = why
            keys.remove("slotkeeper-postgres")
    if "redis" in keys:
        why = servers.redis_missing()
        if why:
            print(f"[bench] skipping the Redis reference: {why}", flush=True)
            skipped["redis"] = why
            keys.remove("redis")
    if not keys:
        raise SystemExit("no server left to measure")
    steps = plan.build(keys, chosen, mode)
    for line in plan.describe(steps, mode):
        print(f"[bench] {line}", flush=True)
    # The scale steps start servers of their own; the others need these running side by side.
    shared = keys if any(s.scenario != "scale" for s in steps) else []
    started: list[servers.Server] = []
    pool: WorkerPool | None = None
    measurements: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    failed = False
    previous = {sig: signal.signal(sig, _on_sigterm) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        phases.enter("start")
        print(f"[bench] starting {', '.join(shared) or 'no shared server'}", flush=True)
        started = [servers.start(key) for key in shared]
        meta["targets"] = [s.key for s in started]
        pool = WorkerPool(args.procs)
        ctx = scenarios.Context(
            pool=pool,
            servers={s.key: s for s in started},
            extra=mode.extra,
            pause=args.pause,
            settle_max=mode.settle_max,
            began=began,
        )
        # While the servers boot: note the versions.
        meta["versions"][".venv"] = _versions_here(SLOTKEEPER_PACKAGES)
        if "slotkeeper-postgres" in keys:
            meta["versions"]["PostgreSQL server"] = {"postgresql": servers.postgres_version() or "?"}
        # bench-0 .. bench-(count-1): one per client of pairs, per events client, per SDK holder.
        count = max(max(mode.clients), mode.extra.events_clients, mode.extra.sdk_holders)
        # Prefect's server takes a while to boot: slotkeeper's scale steps run meanwhile, with
        # Prefect's server frozen while they measure (Context.quiet), as an idle server is.
        ctx.booting = [s for s in started if not s.key.startswith("slotkeeper")]
        _start(ctx, [s for s in started if s not in ctx.booting], count, meta)
        for step in steps:
            if step.scenario != "scale" and ctx.booting:
                phases.enter("boot")
                _start(ctx, ctx.booting, count, meta)
                ctx.booting = []
            phases.enter("pairs" if step.scenario == "health" else step.scenario)
            (measurements if step.scenario in ("pairs", "health") else others).extend(
                run_step(ctx, step, mode)
            )
        meta["complete"] = True
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"[bench] interrupted ({type(exc).__name__}); stopping everything", flush=True)
        meta["notes"].append("the run was interrupted; the figures are partial")
    except Exception as exc:
        traceback.print_exc()
        print("[bench] failed; stopping everything", flush=True)
        meta["notes"].append(f"the run failed ({exc!r}); the figures are partial")
        failed = True
    finally:
        phases.enter("stop")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pool is not None:
            pool.close()
        for server in started:
            server.terminate()  # they stop while the report is written
    code = 1 if failed else 130
    try:
        if measurements or others:
            phases.enter("report")
            results = _report(args, meta, mode, measurements, others, phases.total())
            if meta["complete"]:
                code = 1 if args.check and not _targets_met(results) else 0
    finally:
        phases.enter("stop")
        servers.stop_all(started)
        print(f"[bench] stopped {len(started)} server(s)", flush=True)
    print(f"[bench] {phases.summary()}", flush=True)
    return code


def _report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    mode: plan.Mode,
    measurements: list[dict[str, Any]],
    others: list[dict[str, Any]],
    elapsed: float,
) -> dict[str, Any]:
    """Write the results and the docs, print the summary; the results."""
    meta["machine"]["loadavg_after"] = _loadavg()
    meta["elapsed_s"] = elapsed
    summary = report.summarize(measurements)
    if "scale" in meta["scenarios"]:
        meta["prefect_scale_note"] = scale.prefect_note(meta, summary["cells"], mode.extra)
    results: dict[str, Any] = {
        "meta": meta,
        "measurements": measurements,
        "summary": summary,
        "scenarios": others,
        "scenario_summary": report_scenarios.summarize(others),
    }
    write_json(results, args.out)
    print(f"[bench] wrote {args.out} ({elapsed:.0f} s of measuring)", flush=True)
    publish(results, args.docs)
    _print_summary(results)
    return results


def _targets_met(results: dict[str, Any]) -> bool:
    """Whether slotkeeper met every target of the scenarios measured."""
    ok = True
    targets = results["summary"]["targets"]
    if targets and not (targets["pairs_ok"] and targets["errors_ok"] and targets["p99_ok"]):
        ok = False
    for target in results["scenario_summary"].get("targets", []):
        if target["met"] is False and not target.get("proposed"):
            ok = False
    return ok


def _print_summary(results: dict[str, Any]) -> None:
    for c in results["summary"]["cells"]:
        r = c["rate"]
        print(
            f"[bench] {c['scenario']:6} {c['target']:20} c={c['clients']:<3} median {r['median']:9.1f} "
            f"[{r['min']:.1f}-{r['max']:.1f}]  p99 {c['p99_ms']['median'] or 0:.1f} ms  errors {c['error_total']}",
            flush=True,
        )
    for ratio in results["summary"]["ratios"]:
        s = ratio["ratio"]
        if s["median"] is not None:
            print(
                f"[bench] ratio {ratio['target']}/prefect c={ratio['clients']}: {s['median']:.1f}x "
                f"[{s['min']:.1f}-{s['max']:.1f}]",
                flush=True,
            )
    for line in report_scenarios.summary_lines(results["scenario_summary"]):
        print(f"[bench] {line}", flush=True)
    for line in _postgres_lines(results):
        if line.startswith("|") or line.startswith("Targets") or line.startswith("Two"):
            print(f"[bench] {line}", flush=True)


def _reexec_in_venv() -> None:
    """Run under ``.venv``'s Python (it has aiohttp and slotkeeper) when started with another."""
    venv = servers.SLOTKEEPER_VENV
    python = venv / "bin" / "python"
    if (
        Path(sys.prefix).resolve() != venv.resolve()
        and python.exists()
        and not os.environ.get("BENCH_NO_REEXEC")
    ):
        os.environ["BENCH_NO_REEXEC"] = "1"
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    _reexec_in_venv()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["summary"] = report.summarize(results["measurements"])
        results["scenario_summary"] = report_scenarios.summarize(results.get("scenarios", []))
        publish(results, True)
        return 0
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
