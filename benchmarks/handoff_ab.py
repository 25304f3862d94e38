"""A/B of the hand-off with the SDK (issue 14, item 2): two source trees, alternated, in one run.

Each round runs ``benchmarks/run``'s hand-off scenario once per side (A B, then B A, ...): the
SDK variant on SQLite and on PostgreSQL, the machine floor and the durable floor, measured in the
same run as the side's figures, with windows longer than ``--short``'s (1 s warm-up, 4 s
measured). A side is a ``src`` folder, put first on ``PYTHONPATH`` of everything the run starts
(the servers, the load generator and its SDK). It prints, per side, each backend's grants per
second as a share of its floor's of the same run (SQLite against the machine floor, PostgreSQL
against the durable floor), the p99 wait beyond ideal as a multiple of that floor's, the hand-off
gap's median, Jain's index and the overtakes; then the medians and ranges per side. Compare the
shares, not the absolute figures: the machine is shared. Usage::

    git archive main src | tar -x -C /tmp/ab-main
    .venv/bin/python benchmarks/handoff_ab.py --a-src /tmp/ab-main/src --b-src src --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BACKENDS = (("slotkeeper-sqlite", "floor"), ("slotkeeper-postgres", "floor-fsync"))


def _one(out: str) -> int:
    """One run of the hand-off (SDK variant on both backends, both floors), results to ``out``."""
    sys.path.insert(0, str(HERE))
    import plan
    import run

    extra = replace(
        plan.MODES["short"].extra,
        handoff_warmup=1.0,
        handoff_duration=4.0,
        handoff_sqlite=("sdk",),
        handoff_postgres=("sdk",),
        handoff_floor_durable=True,
    )
    plan.MODES["short"] = replace(plan.MODES["short"], extra=extra)
    argv = ["--short", "--rounds", "1", "--scenarios", "handoff", "--no-docs", "--out", out]
    argv += ["--servers", ",".join(key for key, _ in BACKENDS)]
    return run.main(argv)


def figures(path: Path) -> list[dict[str, Any]]:
    """Per backend: the SDK's figures against its floor of the same run."""
    handoffs = {
        (s["target"], s["variant"]): s
        for s in json.loads(path.read_text())["scenarios"]
        if s["scenario"] == "handoff"
    }
    floors = {variant: s for (_, variant), s in handoffs.items() if variant.startswith("floor")}
    out = []
    for key, floor_variant in BACKENDS:
        sdk, floor = handoffs[(key, "sdk")], floors[floor_variant]
        out.append(
            {
                "server": key,
                "grants_per_s": sdk["grants_per_s"],
                "pct_of_floor": 100.0 * sdk["grants_per_s"] / floor["grants_per_s"],
                "floor_per_s": floor["grants_per_s"],
                "p99_beyond_ms": sdk["excess_ms"]["p99"],
                "p99_x_floor": sdk["excess_ms"]["p99"] / floor["excess_ms"]["p99"],
                "gap_p50_ms": (sdk["gap_ms"] or {}).get("p50"),
                "jain": sdk["jain"],
                "overtakes": sdk["overtakes"],
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a-src", help="side A's src folder (required)")
    p.add_argument(
        "--b-src", default=str(HERE.parent / "src"), help="side B's src folder (default: this tree's)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _one(args.one)
    if not args.a_src:
        p.error("--a-src is required")
    sides = {"A": str(Path(args.a_src).resolve()), "B": str(Path(args.b_src).resolve())}
    results: dict[str, list[list[dict[str, Any]]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            for side in ("A", "B") if rnd % 2 else ("B", "A"):
                out = Path(tmp) / f"{side}{rnd}.json"
                env = {**os.environ, "PYTHONPATH": sides[side], "BENCH_NO_REEXEC": "1"}
                load = os.getloadavg()[0]
                subprocess.run([sys.executable, __file__, "--one", str(out)], env=env, check=True)
                rows = figures(out)
                results[side].append(rows)
                shown = " | ".join(
                    f"{r['server']}: {r['grants_per_s']:.1f}/s = {r['pct_of_floor']:.0f} % of its floor "
                    f"({r['floor_per_s']:.1f}/s), p99 beyond ideal {r['p99_beyond_ms']:.0f} ms = "
                    f"{r['p99_x_floor']:.1f}x, gap p50 {r['gap_p50_ms']:.2f} ms, Jain {r['jain']:.3f}, "
                    f"overtakes {r['overtakes']}"
                    for r in rows
                )
                print(f"[handoff-ab] round {rnd} {side} (load {load:.1f}): {shown}", flush=True)
    for side, runs in results.items():
        for i, (key, _) in enumerate(BACKENDS):
            pct = sorted(rows[i]["pct_of_floor"] for rows in runs)
            p99 = sorted(rows[i]["p99_x_floor"] for rows in runs)
            gap = sorted(rows[i]["gap_p50_ms"] or 0.0 for rows in runs)
            overtakes = [rows[i]["overtakes"] for rows in runs]
            print(
                f"[handoff-ab] {side} {key}: % of the floor median {statistics.median(pct):.0f} "
                f"[{pct[0]:.0f}-{pct[-1]:.0f}], p99 beyond ideal x the floor's median "
                f"{statistics.median(p99):.1f}, gap p50 median {statistics.median(gap):.2f} ms, "
                f"overtakes {overtakes}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
