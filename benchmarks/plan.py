"""The plan of a run: what is measured, in which order, how long, and about how long it all takes.

One list of :class:`Step` drives a run (``run.py`` executes it in order); ``--plan`` prints it
with its estimate without starting anything, and every run prints the estimate first.

Order: the scale scenario first (slotkeeper only, on servers of its own: it runs while Prefect's
server boots, which is frozen during its measurements), then pairs, handoff, sdk, client, rate
and events. A new scenario plugs in with a key in ``scenarios.SCENARIOS``, its steps here (and
their duration in :func:`seconds`), its measurement in ``run.run_step`` and its section in
``report_scenarios`` (``summarize``, ``render``, ``progress``). Within each scenario, round after round, the servers take turns in an order that
rotates every round (A B C, then B C A, ...), so that no server is always measured first or
right after a given other one. The hand-off's machine floor (``floor.py``, variant "floor")
takes its turn in that rotation like a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from scenarios import EXTRA, FLOOR, FLOOR_DURABLE, FLOORS, Extra
from servers import REFERENCE_KEYS

PREFECT = "prefect-sqlite"


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
    extra: Extra = field(default_factory=Extra)


MODES = {
    "short": Mode("short", 2, 0.25, 1.0, 0.2, (1, 16, 64), (64,), 1.5, EXTRA["short"]),
    "full": Mode("full", 3, 2.0, 15.0, 1.0, (1, 16, 64), (1, 16, 64), 10.0, EXTRA["full"]),
}


def smoke(mode: Mode) -> Mode:
    """The same plan with every window cut to a fraction of a second: it checks that each step
    runs (figures meaningless). The sizes (clients, limits, leases) are kept."""
    x = mode.extra
    return replace(
        mode,
        name=f"{mode.name} (smoke)",
        warmup=0.1,
        duration=0.5,
        settle_max=0.5,
        extra=replace(
            x,
            handoff_warmup=0.1,
            handoff_duration=0.5,
            client_timeout=1.0,
            rate_duration=1.5,  # the steady rate is counted after the first second
            events_warmup=0.1,
            events_duration=0.5,
            scale_warmup=0.1,
            scale_duration=0.5,
            procs_warmup=0.1,
            procs_duration=0.5,
        ),
    )


@dataclass(frozen=True)
class Step:
    """One measurement: ``scenario`` (or "health", the generator's ceiling) on one server."""

    scenario: str
    round: int
    target: str
    #: sdk: "session" or "redis". handoff: "wait", "sdk", "poll" or "floor". A "floor" step measures ``floor.py``, which it
    #: starts and stops itself: its ``target`` is only the running server the step is dispatched
    #: with (it is not used and stays frozen); its measurements are reported as target "floor".
    variant: str = ""
    #: pairs and health: concurrent clients.
    clients: int = 0


T = TypeVar("T")


def rotated(items: Sequence[T], rnd: int) -> list[T]:
    """The turn order of round ``rnd``: A B C, then B C A, then C A B..."""
    if not items:
        return []
    shift = (rnd - 1) % len(items)
    return [*items[shift:], *items[:shift]]


def handoff_targets(keys: Sequence[str], extra: Extra) -> list[tuple[str, str]]:
    """(server key, variant) measured in the hand-off: slotkeeper's per backend, Prefect polling,
    then the machine's floor (dispatched with the first server, see :class:`Step`)."""
    wanted = {
        "slotkeeper-sqlite": extra.handoff_sqlite,
        "slotkeeper-postgres": extra.handoff_postgres,
        PREFECT: ("poll",),
    }
    variants = ("wait", "sdk", "poll")
    out = [(k, v) for v in variants for k in keys if v in wanted.get(k, ())]
    served = [k for k in keys if k not in REFERENCE_KEYS]
    if extra.handoff_floor and served:
        out.append((served[0], FLOOR))
    if extra.handoff_floor_durable and "slotkeeper-postgres" in served:
        out.append((served[0], FLOOR_DURABLE))
    return out


def sdk_targets(keys: Sequence[str]) -> list[tuple[str, str]]:
    """(server key, variant) measured in "sdk": slotkeeper's SDK over its session on each
    backend, and the Redis semaphore."""
    out = [(k, "session") for k in ("slotkeeper-sqlite", "slotkeeper-postgres") if k in keys]
    return [*out, ("redis", "redis")] if "redis" in keys else out


def build(keys: Sequence[str], chosen: Sequence[str], mode: Mode) -> list[Step]:
    """Every measurement of the run, in run order."""
    x = mode.extra
    steps = [Step("scale", 1, k) for k in keys if "scale" in chosen and k.startswith("slotkeeper-")]
    if "pairs" in chosen:
        ceiling = next((k for k in ("slotkeeper-sqlite", "slotkeeper-postgres") if k in keys), None)
        for rnd in range(1, mode.rounds + 1):
            for clients in mode.clients:
                turn = [("pairs", k) for k in keys]
                if ceiling and clients in mode.ceiling_clients:
                    turn.append(("health", ceiling))
                steps += [Step(s, rnd, k, clients=clients) for s, k in rotated(turn, rnd)]
    if "handoff" in chosen:
        for rnd in range(1, mode.rounds + 1):
            steps += [Step("handoff", rnd, k, v) for k, v in rotated(handoff_targets(keys, x), rnd)]
    if "sdk" in chosen:
        turn = sdk_targets(keys)
        for rnd in range(1, mode.rounds + 1):
            steps += [Step("sdk", rnd, k, v) for k, v in rotated(turn, rnd)]
    # The reference servers (Redis) take part in "pairs" and "sdk" only.
    served = [k for k in keys if k not in REFERENCE_KEYS]
    for scenario, rounds in (("client", x.client_rounds), ("rate", x.rate_rounds), ("events", mode.rounds)):
        if scenario in chosen:
            steps += [Step(scenario, r, k) for r in range(1, rounds + 1) for k in rotated(served, r)]
    if "procs" in chosen and "slotkeeper-postgres" in keys:
        # Two servers of its own on one database, started and stopped within each step (procs.py).
        steps += [Step("procs", r, "slotkeeper-postgres") for r in range(1, mode.rounds + 1)]
    return steps


# --- how long it takes ------------------------------------------------------------------------
#
# Seconds on this 2-core machine when it is quiet, measured on --short runs: the windows come
# from the mode, the rest (setting up, priming, settling) from these constants. A busy machine
# takes longer.

PREFECT_BOOT = 11.0  # `prefect server start` until healthy (imports, migrations of a fresh database)
SLOTKEEPER_BOOT = 1.5
CREATE_LIMITS = {True: 1.2, False: 0.3}  # the 64 pairs limits: on Prefect's server, on slotkeeper's
REPORT = 2.0  # JSON, plots and docs (the servers stop meanwhile)
STEP = 0.25  # every measurement: resume, health check, connections, settling, freezing
PRIME = {True: 0.6, False: 0.15}  # teaching a fresh limit its hold time: on Prefect's server, on slotkeeper's
FLOOR_START = 0.3  # floor.py's start (Python, uvloop), its probe and its stop
SDK_START = 0.8  # the holders' process: Python, the SDK or redis-py, its first connection
CLIENT_START = 1.0  # .venv-prefect's Python importing Prefect, its warm-up block
EVENTS_SETUP = 0.2  # subscriber, probe event, waiting for the last deliveries
SCALE_INSERT_PER_S = {"sqlite": 25_000, "postgres": 12_000}  # leases inserted per second
SCALE_SHORT_PER_S = 300  # short leases taken per second
SCALE_SETUP = SLOTKEEPER_BOOT + 1.0  # its server's start, migration, stop


def _scale_setup(step: Step, x: Extra) -> float:
    """The part of a scale step not measured (it overlaps Prefect's boot)."""
    return x.scale_leases / SCALE_INSERT_PER_S[step.target.split("-", 1)[1]] + SCALE_SETUP


def seconds(step: Step, mode: Mode) -> float:
    """About how long one step takes; a client run counts at its cut-off (an upper bound)."""
    x, prefect = mode.extra, step.target == PREFECT
    if step.scenario in ("pairs", "health"):
        return STEP + mode.warmup + mode.duration
    if step.scenario == "handoff" and step.variant in FLOORS:
        return STEP + FLOOR_START + x.handoff_warmup + x.handoff_duration
    if step.scenario == "handoff":
        return STEP + PRIME[prefect] + x.handoff_warmup + x.handoff_duration
    if step.scenario == "sdk":
        return STEP + SDK_START + x.sdk_warmup + x.sdk_duration
    if step.scenario == "client":
        return STEP + CLIENT_START + len(x.client_limits) * (PRIME[prefect] + x.client_timeout)
    if step.scenario == "rate":
        return STEP + x.rate_duration
    if step.scenario == "events":
        return STEP + EVENTS_SETUP + x.events_warmup + x.events_duration
    if step.scenario == "procs":  # two servers start, 64 limits, two windows, stop
        return (
            2 * SLOTKEEPER_BOOT + CREATE_LIMITS[False] + 2 * (STEP + x.procs_warmup + x.procs_duration) + 1.0
        )
    if step.scenario == "scale":
        reaper = x.scale_short_leases / SCALE_SHORT_PER_S + x.scale_short_duration + 0.5
        return _scale_setup(step, x) + x.scale_warmup + x.scale_duration + reaper
    raise ValueError(f"unknown scenario {step.scenario!r}")


def estimate(steps: Sequence[Step], mode: Mode) -> dict[str, float]:
    """Seconds per phase of the run, in run order (``start``: until the servers measured first are
    healthy and have their limits; ``boot``: waiting for Prefect's server after the scale steps)."""
    out = {"start": SLOTKEEPER_BOOT + CREATE_LIMITS[False]}
    if any(s.target == PREFECT for s in steps):
        overlap = sum(_scale_setup(s, mode.extra) for s in steps if s.scenario == "scale")
        out["boot"] = max(0.0, PREFECT_BOOT - out["start"] - overlap) + CREATE_LIMITS[True]
    for step in steps:
        phase = "pairs" if step.scenario == "health" else step.scenario
        out[phase] = out.get(phase, 0.0) + seconds(step, mode)
    out["report"] = REPORT
    return out


def describe(steps: Sequence[Step], mode: Mode) -> list[str]:
    """The plan and its estimate, one line per phase."""
    phases = estimate(steps, mode)
    total = sum(phases.values())
    bound = ", client runs counted at their cut-off" if "client" in phases else ""
    lines = [
        f"plan ({mode.name} mode): {len(steps)} measurements; about {total:.0f} s ({total / 60:.1f} min) "
        f"on a quiet machine{bound}"
    ]
    for phase, secs in phases.items():
        mine = [s for s in steps if s.scenario == phase or (phase == "pairs" and s.scenario == "health")]
        what = ""
        if mine:
            rounds = max(s.round for s in mine)
            tags = {s: s.variant or ("ceiling" if s.scenario == "health" else "") for s in mine}
            who = sorted(
                {
                    f"machine floor (floor.py{' --fsync' if s.variant == FLOOR_DURABLE else ''})"
                    if s.variant in FLOORS
                    else s.target + (f" ({tag})" if tag else "")
                    for s, tag in tags.items()
                }
            )
            what = f"{len(mine)} x, {rounds} round(s): {', '.join(who)}"
            if phase == "pairs":
                what += f"; clients {','.join(map(str, mode.clients))}"
        lines.append(f"  {phase:8} {secs:6.0f} s  {what}")
    return lines
