"""Benchmark slotkeeper against Prefect's server: throughput of acquire + release pairs.

Usage::

    python benchmarks/run.py [--short|--full] [--servers slotkeeper-sqlite,slotkeeper-postgres,prefect-sqlite]
                             [--out benchmarks/results/latest.json] [--no-docs] [--check]
    python benchmarks/run.py --from-json benchmarks/results/latest.json   # re-render the docs only

It starts every server on a free loopback port, creates the limits, then measures each scenario
on each server in alternation for several rounds (the order rotates every round; servers not
being measured are frozen with SIGSTOP), measures the load generator's ceiling the same way,
writes the JSON results and regenerates the generated part of ``docs/benchmarks.md``. Every
process it starts is stopped at the end, on Ctrl-C and on errors.
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
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

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
LIMITS = 64  # bench-0 .. bench-63, one per client at most


@dataclass(frozen=True)
class Mode:
    """How long and how often to measure."""

    name: str
    rounds: int
    warmup: float
    duration: float
    #: Seconds after the window before in-flight requests are cancelled.
    grace: float
    clients: tuple[int, ...]
    #: Client counts at which the generator's ceiling is measured.
    ceiling_clients: tuple[int, ...]
    #: Longest wait for a server to go idle after a measurement, before it is frozen.
    settle_max: float
    #: The scenarios beyond "pairs" (see ``scenarios.Extra``).
    extra: scenarios.Extra = field(default_factory=scenarios.Extra)


MODES = {
    "short": Mode("short", 2, 0.5, 2.5, 0.2, (1, 16, 64), (64,), 1.5, scenarios.EXTRA["short"]),
    "full": Mode("full", 3, 2.0, 15.0, 1.0, (1, 16, 64), (1, 16, 64), 10.0, scenarios.EXTRA["full"]),
}


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


def _versions_prefect() -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform, sqlite3, sys\n"
        "out = {'python': platform.python_version(), 'sqlite': sqlite3.sqlite_version}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    python = servers.PREFECT_VENV / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", code, *PREFECT_PACKAGES], capture_output=True, text=True, check=False
    )
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-200:]}


# --- talking to a server (setup only; the load goes through loadgen) --------------------------


def _post_json(url: str, body: dict[str, Any], timeout: float = 30.0) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def create_limits(server: servers.Server, count: int) -> float:
    """Create ``bench-0`` .. ``bench-{count-1}`` with limit 1000 (an existing one is fine);
    return the seconds it took."""
    began = time.monotonic()
    for i in range(count):
        status = 0
        for _ in range(5):  # bounded: Prefect may answer 503 while it settles after start-up
            status = _post_json(
                server.base_url + "/api/v2/concurrency_limits/", {"name": f"bench-{i}", "limit": 1000}
            )
            if status in (200, 201, 409):
                break
            time.sleep(0.5)
        else:
            raise servers.ServerError(f"{server.key}: creating limit bench-{i} answered {status}")
    return time.monotonic() - began


# --- measuring --------------------------------------------------------------------------------


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def settle(server: servers.Server, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the server has gone idle; return the seconds waited."""
    began = time.monotonic()
    pids = server.pids()
    while time.monotonic() - began < max_wait:
        c0, t0 = servers.cpu_seconds(pids), time.monotonic()
        time.sleep(0.1)
        if (servers.cpu_seconds(pids) - c0) / (time.monotonic() - t0) < 0.15:
            break
    return time.monotonic() - began


def measure(
    pool: WorkerPool,
    server: servers.Server,
    scenario: str,
    clients: int,
    mode: Mode,
    round_no: int,
    pause_after: bool,
) -> dict[str, Any]:
    """One measurement: ``clients`` clients doing ``scenario`` against ``server``."""
    from loadgen import Job, merge, split_clients

    entered = time.monotonic()
    server.resume()
    if not servers.healthy(server, timeout=5):
        servers.wait_healthy([server], timeout=30)
    jobs = [
        Job(
            kind="pairs" if scenario == "pairs" else "health",
            base_url=server.base_url,
            clients=share,
            warmup=mode.warmup,
            duration=mode.duration,
            grace=mode.grace,
            request_timeout=mode.warmup + mode.duration + 30.0,
            max_ops=int((mode.warmup + mode.duration + 1) * 100_000),
        )
        for share in split_clients(clients, len(pool.pids))
    ]
    try:
        pool.prepare(jobs, timeout=60)
        server_pids, loadgen_pids = server.pids(), pool.pids
        start = time.time() + 0.05
        pool.start(start)
        _sleep_until(start + mode.warmup)
        s0 = (
            time.monotonic(),
            servers.cpu_seconds(server_pids),
            servers.cpu_seconds(loadgen_pids),
            servers.machine_cpu(),
        )
        _sleep_until(start + mode.warmup + mode.duration)
        s1 = (
            time.monotonic(),
            servers.cpu_seconds(server_pids),
            servers.cpu_seconds(loadgen_pids),
            servers.machine_cpu(),
        )
        results = pool.collect(timeout=mode.grace + 60)
        settled = settle(server, mode.settle_max)
    finally:
        if pause_after:
            server.pause()
    merged = merge(results)
    wall = s1[0] - s0[0]
    server_cores = (s1[1] - s0[1]) / wall
    loadgen_cores = (s1[2] - s0[2]) / wall
    busy_cores = (s1[3][0] - s0[3][0]) / wall
    return {
        "target": server.key,
        "scenario": scenario,
        "clients": clients,
        "round": round_no,
        "duration_s": mode.duration,
        "completed": merged.completed,
        "rate": merged.completed / mode.duration,
        "latency": report.latency_summary(merged.latencies),
        "release_latency": report.latency_summary(merged.release_latencies),
        "errors": merged.errors,
        "error_total": sum(merged.errors.values()),
        "unfinished": merged.unfinished,
        "cpu": {
            "server_cores": server_cores,
            "loadgen_cores": loadgen_cores,
            "machine_busy_cores": busy_cores,
            "other_cores": max(0.0, busy_cores - server_cores - loadgen_cores),
            "steal_cores": (s1[3][1] - s0[3][1]) / wall,
        },
        "settle_s": settled,
        "wall_s": time.monotonic() - entered,
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


def schedule(keys: list[str], ceiling_key: str | None, mode: Mode) -> list[tuple[int, str, str, int]]:
    """(round, server key, scenario, clients) in run order.

    Within a round, each client count is measured on every server in turn; the turn order
    rotates from round to round (A B C, B C A, ...), so no server is always measured first or
    right after a given other one. The ceiling takes a turn like a server at its client counts.
    """
    plan = []
    for rnd in range(1, mode.rounds + 1):
        for clients in mode.clients:
            turn: list[tuple[str, str]] = [(k, "pairs") for k in keys]
            if ceiling_key and clients in mode.ceiling_clients:
                turn.append((ceiling_key, "health"))
            shift = (rnd - 1) % len(turn)
            for key, scenario in turn[shift:] + turn[:shift]:
                plan.append((rnd, key, scenario, clients))
    return plan


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
    p.add_argument("--rounds", type=int, help="override the number of rounds (pairs, handoff, rate, events)")
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
    return p.parse_args(argv)


def _mode(args: argparse.Namespace) -> Mode:
    mode = MODES[args.mode]
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
    report.update_docs(DOCS, report.render(results, plot=plot, extra_plots=plots))
    written = [p for p in ([plot] if plot else []) + list(plots.values())]
    print(
        f"[bench] wrote {DOCS.relative_to(ROOT)}"
        + (f" and docs/{', docs/'.join(written)}" if written else ""),
        flush=True,
    )


def _scenarios(args: argparse.Namespace) -> list[str]:
    chosen = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in scenarios.SCENARIOS]
    if unknown or not chosen:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(scenarios.SCENARIOS)}")
    return [k for k in scenarios.SCENARIOS if k in chosen]


def _rotated(items: list[Any], rnd: int) -> list[Any]:
    """The turn order of round ``rnd``: A B C, then B C A, then C A B..."""
    if not items:
        return []
    shift = (rnd - 1) % len(items)
    return items[shift:] + items[:shift]


def run_scenarios(
    ctx: scenarios.Context,
    chosen: list[str],
    mode: Mode,
    out: list[dict[str, Any]],
    scale_backends: list[str],
) -> None:
    """Every scenario beyond "pairs", server after server in rotating order, round after round."""
    x = mode.extra
    keys = list(ctx.servers)
    for scenario in chosen:
        if scenario == "handoff":
            targets = scenarios.handoff_targets(ctx)
            for rnd in range(1, mode.rounds + 1):
                for key, variant in _rotated(targets, rnd):
                    m = scenarios.measure_handoff(ctx, ctx.servers[key], variant, rnd)
                    out.append(m)
                    ctx.log(report_scenarios.progress(m))
        elif scenario == "client":
            for rnd in range(1, x.client_rounds + 1):
                for key in _rotated(keys, rnd):
                    for m in scenarios.measure_client(ctx, ctx.servers[key], rnd):
                        out.append(m)
                        ctx.log(report_scenarios.progress(m))
        elif scenario == "rate":
            for rnd in range(1, mode.rounds + 1):
                for key in _rotated(keys, rnd):
                    m = scenarios.measure_rate(ctx, ctx.servers[key], rnd)
                    out.append(m)
                    ctx.log(report_scenarios.progress(m))
        elif scenario == "events":
            for rnd in range(1, mode.rounds + 1):
                for key in _rotated(keys, rnd):
                    m = scenarios.measure_events(ctx, ctx.servers[key], rnd)
                    out.append(m)
                    ctx.log(report_scenarios.progress(m))
        elif scenario == "scale":
            for backend in scale_backends:
                m = scale.measure_scale(ctx, backend)
                out.append(m)
                ctx.log(report_scenarios.progress(m))


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Start the servers, measure, stop everything, write the results."""
    from loadgen import WorkerPool

    mode = _mode(args)
    chosen = _scenarios(args)
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in servers.SERVER_KEYS]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {', '.join(servers.SERVER_KEYS)}")
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
        servers.ensure_prefect_venv()
    if "slotkeeper-postgres" in keys:
        why = servers.postgres_reachable()
        if why:
            print(f"[bench] skipping slotkeeper-postgres: {why}", flush=True)
            skipped["slotkeeper-postgres"] = why
            keys.remove("slotkeeper-postgres")
    if not keys:
        raise SystemExit("no server left to measure")
    # The scale scenario starts servers of its own, on the backends of the slotkeeper servers chosen.
    scale_backends = (
        [k.split("-", 1)[1] for k in keys if k.startswith("slotkeeper")] if "scale" in chosen else []
    )
    # The others need the servers running side by side.
    alternated = [k for k in keys if any(c != "scale" for c in chosen)]
    started: list[servers.Server] = []
    pool: WorkerPool | None = None
    measurements: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    failed = False
    previous = {sig: signal.signal(sig, _on_sigterm) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        print(
            f"[bench] scenarios {', '.join(chosen)}; starting {', '.join(alternated) or 'no shared server'}",
            flush=True,
        )
        for key in alternated:
            started.append(servers.start(key))
        pool = WorkerPool(args.procs)
        # While the servers boot (Prefect takes a while): note the versions.
        meta["versions"][".venv"] = _versions_here(SLOTKEEPER_PACKAGES)
        if "prefect-sqlite" in keys:
            meta["versions"][".venv-prefect"] = _versions_prefect()
        if "slotkeeper-postgres" in keys:
            meta["versions"]["PostgreSQL server"] = {"postgresql": servers.postgres_version() or "?"}
        servers.wait_healthy(started, timeout=180)
        print(f"[bench] healthy after {time.monotonic() - began:.1f} s; creating limits", flush=True)
        for server in started:
            count = max(max(mode.clients), mode.extra.events_clients)
            meta["setup"][server.key] = {"limits": count, "seconds": create_limits(server, count)}
            meta["servers"][server.key] = {
                "env": server.env_shown,
                "command": " ".join(shlex.quote(c) for c in server.command),
            }
        meta["targets"] = [s.key for s in started]
        if args.pause:
            for server in started:
                server.pause()
        by_key = {s.key: s for s in started}
        if "pairs" in chosen:
            ceiling_key = next((k for k in ("slotkeeper-sqlite", "slotkeeper-postgres") if k in by_key), None)
            if ceiling_key is None:
                meta["notes"].append(
                    "no slotkeeper server in this run, so the generator ceiling was not measured"
                )
            plan = schedule(list(by_key), ceiling_key, mode)
            print(
                f"[bench] pairs: {len(plan)} measurements of {mode.warmup:g}+{mode.duration:g} s", flush=True
            )
            for rnd, key, scenario, clients in plan:
                m = measure(pool, by_key[key], scenario, clients, mode, rnd, pause_after=args.pause)
                measurements.append(m)
                _progress(m, time.monotonic() - began)
        ctx = scenarios.Context(
            pool=pool,
            servers=by_key,
            extra=mode.extra,
            pause=args.pause,
            settle_max=mode.settle_max,
            began=began,
        )
        run_scenarios(ctx, [c for c in chosen if c != "pairs"], mode, others, scale_backends)
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pool is not None:
            pool.close()
        servers.stop_all(started)
        print(f"[bench] stopped {len(started)} server(s)", flush=True)
    if not measurements and not others:
        return 1 if failed else 130
    meta["machine"]["loadavg_after"] = _loadavg()
    meta["elapsed_s"] = time.monotonic() - began
    summary = report.summarize(measurements)
    if "scale" in chosen:
        meta["prefect_scale_note"] = scale.prefect_note(meta, summary["cells"], mode.extra)
    results: dict[str, Any] = {
        "meta": meta,
        "measurements": measurements,
        "summary": summary,
        "scenarios": others,
        "scenario_summary": report_scenarios.summarize(others),
    }
    write_json(results, args.out)
    print(f"[bench] wrote {args.out} ({meta['elapsed_s']:.0f} s in all)", flush=True)
    publish(results, args.docs)
    _print_summary(results)
    if not meta["complete"]:
        return 1 if failed else 130
    if args.check and not _targets_met(results):
        return 1
    return 0


def _targets_met(results: dict[str, Any]) -> bool:
    """Whether slotkeeper met every target of the scenarios measured."""
    ok = True
    targets = results["summary"]["targets"]
    if targets and not (targets["pairs_ok"] and targets["errors_ok"] and targets["p99_ok"]):
        ok = False
    for target in results["scenario_summary"].get("targets", []):
        if target["met"] is False:
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
