"""Scale (slotkeeper only): many limits and live leases, then acquire latency and reaper lateness.

For each backend a server of its own is prepared and started. The scale steps run first, while
Prefect's server boots: the servers of the other scenarios are frozen during the measurements
(3. and 4.), Prefect's boot goes on during the setup (1. and 2.), whose times are shown too.

1. **Populate** a fresh database in this process, through ``slotkeeper.storage``: migrate it,
   then insert the limits (``scale-0`` ...) and the long-lived leases (one hour) with their
   grants, in batches of 5,000 rows per transaction, using the storage's own ``INSERT``
   statements on its backend. This writes exactly the rows an acquisition writes, except its
   ``acquired`` events: creating 100,000 leases through the API or ``Storage.acquire`` takes
   minutes on this machine (PostgreSQL managed about 160 acquisitions/s in-process), which the
   time budget does not allow.
2. **Start** slotkeeper on it with ``SLOTKEEPER_LEASE_MIN_SECONDS=1`` (short leases allowed).
3. **Acquire latency**: clients do acquire + release pairs on random ``scale-*`` limits.
4. **Reaper lateness**: a websocket subscriber follows ``prefect.concurrency-limit.released``;
   short leases (``scale_short_duration`` s, each with its own holder id) are taken through
   the API on random limits; each expiry releases them, and the server's ``released`` event
   has ``occurred`` = the lease's expiry. Lateness = the event's arrival at the subscriber minus
   ``occurred``: the time between the expiry and the release being written and published (it
   includes the delivery to the subscriber, a few ms). The leases listing
   (``GET .../leases``) cannot show it: it hides a lease from the instant it expires, whether
   the reaper has run or not, and the event's ``received`` equals its ``occurred`` for
   server-written events, so the store does not record when the reaper wrote it either.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import scenarios
import servers
from scenarios import RELEASED, Context, Subscriber, pct, quantiles, run_jobs, wait_for

BATCH = 5_000
LONG_LEASE_SECONDS = 3_600.0


def populate(url: str, limits: int, leases: int) -> dict[str, float]:
    """Migrate ``url`` and insert ``limits`` limits and ``leases`` live leases (spread evenly)."""
    from slotkeeper.storage import migrate, open_storage
    from slotkeeper.storage import queries as q
    from slotkeeper.storage.tx import Tx

    t0 = time.monotonic()
    migrate(url)
    t1 = time.monotonic()
    now = time.time()
    ids = [str(uuid.uuid4()) for _ in range(limits)]
    per_limit = [leases // limits + (1 if i < leases % limits else 0) for i in range(limits)]
    limit_rows = [
        {
            "id": ids[i],
            "name": f"scale-{i}",
            "slot_limit": 1000,
            "active": True,
            "created": now,
            "updated": now,
            "pool_slots": 0,
            "pool_clock": now,
            "denied_slots": 0,
            "slot_decay_per_second": 0.0,
            "avg_slot_occupancy_seconds": 2.0,
            "fencing_token": per_limit[i],
            "pool_event_id": None,
        }
        for i in range(limits)
    ]

    def insert(query: str, rows: list[dict[str, Any]]) -> Any:
        def op(tx: Tx) -> None:
            tx.write_many(query, rows)

        return op

    def insert_leases(lease_rows: list[dict[str, Any]], grant_rows: list[dict[str, Any]]) -> Any:
        def op(tx: Tx) -> None:
            tx.write_many(q.INSERT_LEASE, lease_rows)
            tx.write_many(q.INSERT_GRANT, grant_rows)

        return op

    async def go() -> None:
        storage = open_storage(url)
        try:
            for i in range(0, limits, BATCH):
                await storage.backend.run(insert(q.INSERT_LIMIT, limit_rows[i : i + BATCH]))
            token = [0] * limits
            for start in range(0, leases, BATCH):
                lease_rows, grant_rows = [], []
                for j in range(start, min(leases, start + BATCH)):
                    lease_id, limit = str(uuid.uuid4()), j % limits
                    token[limit] += 1
                    lease_rows.append(
                        {
                            "id": lease_id,
                            "created": now,
                            "expires": now + LONG_LEASE_SECONDS,
                            "slots": 1,
                            "holder_type": None,
                            "holder_id": None,
                        }
                    )
                    grant_rows.append(
                        {
                            "lease_id": lease_id,
                            "limit_id": ids[limit],
                            "slots": 1,
                            "fencing_token": token[limit],
                            "acquired_event_id": None,
                        }
                    )
                await storage.backend.run(insert_leases(lease_rows, grant_rows))
        finally:
            await storage.close()

    asyncio.run(go())
    return {"migrate_s": t1 - t0, "insert_s": time.monotonic() - t1}


async def _short_leases(
    base: str, limits: int, count: int, duration: float, concurrency: int
) -> list[tuple[str, float, int]]:
    """Take ``count`` leases of ``duration`` s on random limits: (holder id, answered, status)."""
    import aiohttp

    rng = random.Random(7)
    out: list[tuple[str, float, int]] = []
    gate = asyncio.Semaphore(concurrency)
    url = base + "/api/v2/concurrency_limits/increment-with-lease"

    async def one(session: aiohttp.ClientSession) -> None:
        holder = str(uuid.uuid4())
        body = {
            "names": [f"scale-{rng.randrange(limits)}"],
            "slots": 1,
            "lease_duration": duration,
            "holder": {"type": "task_run", "id": holder},
        }
        async with gate:
            try:
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    out.append((holder, time.time(), resp.status))
            except (TimeoutError, aiohttp.ClientError, OSError):
                out.append((holder, time.time(), 0))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session) for _ in range(count)))
    return out


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _reaper(ctx: Context, server: servers.Server, limits: int) -> dict[str, Any]:
    x = ctx.extra
    sub = Subscriber(server.base_url, names=[RELEASED])
    problem = sub.start()
    if problem:
        sub.stop()
        return {"failed": f"subscriber: {problem}"}
    try:
        began = time.time()
        created = asyncio.run(
            _short_leases(server.base_url, limits, x.scale_short_leases, x.scale_short_duration, 16)
        )
        took = time.time() - began
        keys = {h for h, _, status in created if status == 200}
        wait_for(
            lambda: keys <= {a.key for a in list(sub.arrivals)},
            x.scale_short_duration + 30.0,
            0.1,
        )
    finally:
        sub.stop()
    mine = [a for a in sub.arrivals if a.key in keys]
    late = [a.arrived - a.occurred for a in mine]
    status, body, _ = scenarios.request_json(
        "POST",
        server.base_url + "/api/events/filter",
        {
            "filter": {
                "event": {"name": [RELEASED]},
                # Only the short leases had a holder (a related task-run resource).
                "related": {"role": ["task-run"]},
                "occurred": {"since": _iso(began), "until": _iso(time.time() + 60)},
            },
            "limit": 1,
        },
    )
    occurred = [a.occurred for a in mine]
    # Releases written by one reaper pass reach the subscriber together: arrivals more than 50 ms
    # apart start a new pass. The time from one pass to the next shows the reaper's period.
    arrivals = sorted(a.arrived for a in mine)
    starts = [t for i, t in enumerate(arrivals) if i == 0 or t - arrivals[i - 1] > 0.05]
    periods = [b - a for a, b in itertools.pairwise(starts)]
    return {
        "passes": len(starts),
        "pass_period_ms": pct(periods),
        "leases_per_pass": len(mine) / len(starts) if starts else None,
        "short_leases": x.scale_short_leases,
        "short_duration_s": x.scale_short_duration,
        "created": len(keys),
        "create_errors": len(created) - len(keys),
        "create_per_s": len(keys) / took if took > 0 else None,
        "released_seen": len(mine),
        "expiry_spread_s": (max(occurred) - min(occurred)) if occurred else None,
        "lateness_ms": pct(late),
        "lateness_quantiles": quantiles(late),
        "events_filter_total": body.get("total") if status == 200 and isinstance(body, dict) else None,
        "received_minus_occurred_max_ms": max(
            ((a.received - a.occurred) * 1000 for a in mine if a.received is not None), default=None
        ),
        "subscriber_error": sub.error,
    }


def measure_scale(ctx: Context, backend: str, rnd: int = 1) -> dict[str, Any]:
    """Populate, start, measure acquire latency and reaper lateness, stop: one backend."""
    x = ctx.extra
    key = f"slotkeeper-{backend}"
    out: dict[str, Any] = {
        "scenario": "scale",
        "target": key,
        "variant": f"{x.scale_limits} limits, {x.scale_leases} leases",
        "round": rnd,
        "limits": x.scale_limits,
        "leases": x.scale_leases,
        "populated_by": "slotkeeper.storage in-process (bulk INSERT, no acquired events)",
    }
    home = Path(tempfile.mkdtemp(prefix=f"bench-scale-{backend}-"))
    database: str | None = None
    server: servers.Server | None = None
    try:
        if backend == "postgres":
            database = servers.create_database()
            url = servers.postgres_url(database)
        else:
            url = f"sqlite:///{home / 'slotkeeper.db'}"
        ctx.log(f"scale {key}: inserting {x.scale_limits:,} limits and {x.scale_leases:,} leases")
        out["populate"] = populate(url, x.scale_limits, x.scale_leases)
        t0 = time.monotonic()
        server = servers.start_slotkeeper_prepared(key, home, database, {"SLOTKEEPER_LEASE_MIN_SECONDS": "1"})
        servers.wait_healthy([server], timeout=120)
        out["start_s"] = time.monotonic() - t0
        status, leases, _ = scenarios.request_json(
            "GET", server.base_url + "/api/v2/concurrency_limits/scale-0/leases"
        )
        out["leases_on_scale_0"] = len(leases) if status == 200 and isinstance(leases, list) else None
        jobs = scenarios.spread_jobs(
            "random-pairs",
            ctx,
            server,
            x.scale_clients,
            x.scale_warmup,
            x.scale_duration,
            0.5,
            {"prefix": "scale-", "count": x.scale_limits, "seed": rnd},
        )
        with ctx.quiet():
            w = run_jobs(ctx, server, jobs, x.scale_warmup, x.scale_duration)
        out.update(
            {
                "clients": x.scale_clients,
                "pairs_per_s": w.merged.completed / (w.end - w.start),
                "acquire_ms": pct(w.merged.latencies),
                "release_ms": pct(w.merged.release_latencies),
                "errors": w.merged.errors,
                "cpu": w.cpu,
            }
        )
        ctx.log(f"scale {key}: {out['pairs_per_s']:.0f} pairs/s; reaping {x.scale_short_leases} short leases")
        with ctx.quiet():
            out["reaper"] = _reaper(ctx, server, x.scale_limits)
    except Exception as exc:
        out["failed"] = repr(exc)[:500]
        if server is not None:
            out["server_log"] = server.log_tail(10)
    finally:
        if server is not None:
            servers.stop_all([server])
        else:
            if database:
                servers.drop_database(database)
            shutil.rmtree(home, ignore_errors=True)
    return out


def prefect_note(
    meta: dict[str, Any], pairs_cells: list[dict[str, Any]], extra: scenarios.Extra
) -> str | None:
    """Why Prefect's server is not in the scale scenario, from this run's own figures."""
    setup = meta.get("setup", {}).get("prefect-sqlite")
    if not setup or not setup.get("seconds"):
        return None
    per_limit = setup["seconds"] / max(1, setup["limits"])
    best = max(
        (
            c["rate"]["median"] or 0.0
            for c in pairs_cells
            if c["target"] == "prefect-sqlite" and c["scenario"] == "pairs"
        ),
        default=0.0,
    )

    def minutes(limits: int, leases: int) -> str:
        text = f"{limits:,} limits about {per_limit * limits / 60:.1f} min"
        if best > 0:
            text += f", {leases:,} acquisitions about {leases / best / 60:.0f} min"
        return text

    text = (
        f"Prefect's server is not in the scale scenario. In this run it created its {setup['limits']} "
        f"limits in {setup['seconds']:.1f} s ({per_limit * 1000:.0f} ms each)"
        + (f" and its best pairs rate was {best:.1f}/s" if best > 0 else "")
        + f"; at that pace setting up would take: {minutes(10_000, 100_000)} at the issue's scale"
    )
    if extra.scale_leases != 100_000:
        text += f" ({minutes(extra.scale_limits, extra.scale_leases)} at this mode's)"
    text += (
        ", against a budget of about 5 minutes for the whole scenario. Its leases live in the "
        "server's memory (`prefect.server.concurrency.lease_storage.memory`, the default), so they "
        "cannot be prepared in its database beforehand either."
    )
    return text
