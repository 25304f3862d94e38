"""What the gateway costs: a forwarded request, and Prefect's flow of tagged tasks, through
slotkeeper in front of Prefect's server against the same directly on Prefect's server.

    .venv/bin/python benchmarks/gateway.py [--requests 2000] [--block 50] [--rounds 3]
        [--tasks 50] [--limit 4] [--hold 0.1] [--only latency|flow] [--json FILE]

One Prefect 3.8.8 server (``prefect server start``, SQLite, from ``.venv-prefect``) and one
slotkeeper (SQLite) with ``SLOTKEEPER_UPSTREAM_URL`` pointing at it, both on loopback.

1. **Latency of a forwarded request.** One client (``http.client``, one keep-alive connection to
   each server, as Prefect's client keeps its own) sends the same request to Prefect directly and
   through the gateway, alternating blocks of ``block`` requests (direct, gateway, direct, ...) so
   that the drift of a shared machine falls on both alike, ``requests`` of each in all after an
   unmeasured warm-up. Two requests: ``GET /api/admin/version`` (no database: what the
   forwarding itself adds) and ``POST /api/flow_runs/filter`` with ``limit: 1`` (a database
   read). Reported: p50, p99 and mean of each, the gateway's extra at p50 and p99 (issue 15's
   targets: +1 ms and +3 ms), and the CPU each server process group spent per request it served
   (``/proc``; steadier than latency on a loaded machine).
2. **Prefect's flow.** ``benchmarks/prefect_flow.py`` in ``.venv-prefect``: one flow of ``tasks``
   tasks tagged with a fresh tag whose limit is ``limit``, each holding its slot ``hold`` s, with
   every task submitted at once. Run directly on Prefect's server then through the gateway,
   ``rounds`` times alternately. Reported per run: the flow's wall time, the 423s Prefect's task
   engine received (each a refusal it slept on before asking again), the 503s (retryable server
   errors, which Prefect's client retries after a backoff), the most tasks inside at once and the
   final state. The floor is ``ceil(tasks / limit) * hold``.

It prints the command, the machine's load and the figures; ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import servers

#: The forwarded requests measured: (label, method, path, JSON body or None).
REQUESTS = (
    ("GET /api/admin/version", "GET", "/api/admin/version", None),
    ("POST /api/flow_runs/filter", "POST", "/api/flow_runs/filter", {"limit": 1}),
)
WARMUP = 100


@contextlib.contextmanager
def running() -> Iterator[tuple[servers.Server, servers.Server]]:
    """Prefect's server and the gateway in front of it, healthy; both stopped at the end."""
    started: list[servers.Server] = []
    try:
        prefect = servers.start_prefect()
        started.append(prefect)
        servers.wait_healthy([prefect], timeout=180)
        home = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
        gateway = servers.start_slotkeeper_prepared(
            "slotkeeper-gateway", home, None, {"SLOTKEEPER_UPSTREAM_URL": prefect.base_url + "/api"}
        )
        started.append(gateway)
        servers.wait_healthy([gateway], timeout=60)
        yield prefect, gateway
    finally:
        servers.stop_all(started)


# --- 1. latency ---------------------------------------------------------------------------------


def _timed(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> float:
    """One request on a kept-alive connection: seconds from sending to the body's last byte."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    began = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    answer.read()
    elapsed = time.perf_counter() - began
    if answer.status != 200:
        raise RuntimeError(f"{method} {path} on {conn.host}:{conn.port} answered {answer.status}")
    return elapsed


def _summary(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": cuts[98] * 1000,
        "mean_ms": statistics.fmean(samples) * 1000,
        "n": len(samples),
    }


def latency(
    prefect: servers.Server, gateway: servers.Server, requests: int, block: int
) -> list[dict[str, Any]]:
    """Each of :data:`REQUESTS` directly and through the gateway, in alternating blocks."""
    out = []
    targets = {"direct": prefect, "gateway": gateway}
    conns = {k: http.client.HTTPConnection(servers.LOOPBACK, s.port, timeout=30) for k, s in targets.items()}
    try:
        for label, method, path, payload in REQUESTS:
            body = None if payload is None else json.dumps(payload).encode()
            for conn in conns.values():
                for _ in range(WARMUP):
                    _timed(conn, method, path, body)
            samples: dict[str, list[float]] = {k: [] for k in targets}
            pids = {k: s.pids() for k, s in targets.items()}
            cpu0 = {k: servers.cpu_seconds(p) for k, p in pids.items()}
            while len(samples["gateway"]) < requests:
                for key, conn in conns.items():
                    samples[key].extend(_timed(conn, method, path, body) for _ in range(block))
            cpu = {k: servers.cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
            direct, through = _summary(samples["direct"]), _summary(samples["gateway"])
            out.append(
                {
                    "request": label,
                    "direct": direct,
                    "gateway": through,
                    "extra_p50_ms": through["p50_ms"] - direct["p50_ms"],
                    "extra_p99_ms": through["p99_ms"] - direct["p99_ms"],
                    # Prefect served every request (direct and forwarded); the gateway half of them.
                    "prefect_cpu_ms_per_request": cpu["direct"] * 1000 / (2 * len(samples["gateway"])),
                    "gateway_cpu_ms_per_request": cpu["gateway"] * 1000 / len(samples["gateway"]),
                }
            )
    finally:
        for conn in conns.values():
            conn.close()
    return out


# --- 2. Prefect's flow --------------------------------------------------------------------------


def run_flow(server: servers.Server, tasks: int, limit: int, hold: float) -> dict[str, Any]:
    """``prefect_flow.py`` against ``server`` (a fresh tag): its JSON line, or the failure."""
    script = Path(__file__).with_name("prefect_flow.py")
    python = servers.PREFECT_VENV / "bin" / "python"
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    timeout = 300.0
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as home:
        env = servers._clean_env(
            PREFECT_API_URL=server.base_url + "/api",
            PREFECT_HOME=home,
            PREFECT_LOGGING_LEVEL="WARNING",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        command = [str(python), str(script), "--tag", tag, "--limit", str(limit), "--tasks", str(tasks)]
        command += ["--hold", str(hold), "--timeout", str(timeout)]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout + 90, check=False
            )
        except subprocess.TimeoutExpired:
            return {"error": f"no answer within {timeout + 90:g} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    try:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": f"unreadable output: {done.stdout.strip()[-300:]!r}"}


def flows(
    prefect: servers.Server, gateway: servers.Server, rounds: int, tasks: int, limit: int, hold: float
) -> list[dict[str, Any]]:
    """The flow on each, alternately, ``rounds`` times."""
    out = []
    for rnd in range(rounds):
        for key, server in (("direct", prefect), ("gateway", gateway)):
            result = run_flow(server, tasks, limit, hold)
            out.append({"round": rnd, "target": key, **result})
            print(f"  round {rnd} {key}: {_flow_line(result)}", flush=True)
    return out


def _flow_line(r: dict[str, Any]) -> str:
    if r.get("error") and "wall_s" not in r:
        return f"failed: {r['error']}"
    return (
        f"{r['wall_s']:.2f} s, {r['refused_423']} x 423, {r['unavailable_503']} x 503, most inside {r['most_inside']}, "
        f"{r['state']}, statuses {r['statuses']}" + (f", error {r['error']}" if r.get("error") else "")
    )


# --- output -------------------------------------------------------------------------------------


def print_latency(rows: list[dict[str, Any]], requests: int, block: int) -> None:
    print(f"\nForwarded request latency (ms; {requests} of each, alternating blocks of {block}, one client):")
    print(f"{'request':<30} {'target':<8} {'p50':>8} {'p99':>8} {'mean':>8}")
    for row in rows:
        for key in ("direct", "gateway"):
            s = row[key]
            print(
                f"{row['request']:<30} {key:<8} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['mean_ms']:>8.2f}"
            )
        print(
            f"{'':<30} {'extra':<8} {row['extra_p50_ms']:>+8.2f} {row['extra_p99_ms']:>+8.2f}"
            "   (targets: +1 ms p50, +3 ms p99)"
        )
        print(
            f"{'':<30} CPU per request: Prefect's server {row['prefect_cpu_ms_per_request']:.2f} ms, "
            f"the gateway {row['gateway_cpu_ms_per_request']:.2f} ms"
        )


def print_flows(rows: list[dict[str, Any]], tasks: int, limit: int, hold: float) -> None:
    floor = math.ceil(tasks / limit) * hold
    print(
        f"\nPrefect's flow: {tasks} tasks tagged on a tag limit of {limit}, {hold} s holds (floor {floor:.1f} s):"
    )
    print(f"{'target':<8} {'wall s (each round)':<28} {'median':>7}  {'423s':<16} {'503s':<16}")
    for key in ("direct", "gateway"):
        runs = [r for r in rows if r["target"] == key and "wall_s" in r]
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs)
        median = statistics.median(r["wall_s"] for r in runs) if runs else float("nan")
        refused = ", ".join(str(r["refused_423"]) for r in runs)
        unavailable = ", ".join(str(r["unavailable_503"]) for r in runs)
        print(f"{key:<8} {walls:<28} {median:>7.2f}  {refused:<16} {unavailable:<16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per target and path")
    parser.add_argument("--block", type=int, default=50, help="requests per block before switching target")
    parser.add_argument("--rounds", type=int, default=3, help="flow runs per target, alternated")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--hold", type=float, default=0.1)
    parser.add_argument("--only", choices=["latency", "flow"], help="run one part only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    versions = servers.ensure_prefect_venv()
    print(f"versions (.venv-prefect): {versions}")
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    figures: dict[str, Any] = {"command": sys.argv, "versions": versions}
    with running() as (prefect, gateway):
        if args.only in (None, "latency"):
            figures["latency"] = latency(prefect, gateway, args.requests, args.block)
            print_latency(figures["latency"], args.requests, args.block)
        if args.only in (None, "flow"):
            print("\nPrefect's flow, each run as it ends:", flush=True)
            figures["flow"] = flows(prefect, gateway, args.rounds, args.tasks, args.limit, args.hold)
            print_flows(figures["flow"], args.tasks, args.limit, args.hold)
    print(f"\nload average after: {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
