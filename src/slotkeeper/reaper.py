"""The reaper: ends expired leases, so a crashed holder's slots come back by themselves.

Occupancy already ignores a lease the moment it expires (see ``SELECT_LEASED_SLOTS``); the reaper
deletes the expired rows, updates the occupancy averages and (with events) records the release,
exactly once per lease, within about ``interval`` seconds of the expiry.
"""

from __future__ import annotations

import asyncio
import logging

from slotkeeper.events import builders
from slotkeeper.storage import Storage
from slotkeeper.storage.tx import Commit

log = logging.getLogger("slotkeeper.reaper")


#: The reaper's name among the supervised loops (``storage.supervisor``).
REAPER = "reaper"


async def run_reaper(storage: Storage, interval: float, batch: int) -> None:
    """Reap forever: a full batch goes again at once, otherwise the next pass starts
    ``interval`` after this one started (not after it ended), so lateness stays near the interval.

    A failed pass is reported to ``storage.supervisor`` (logged, counted for readiness) and the
    next one waits the supervisor's backoff: a database that keeps failing is not retried four
    times a second, each with its traceback.
    """
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            ended = await storage.reap_expired(batch)
            await storage.sweep_waiters()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup must not stop the reaper
            await asyncio.sleep(storage.supervisor.failure(REAPER, exc))
            continue
        if ended:
            log.debug("reaped %d expired lease(s)", ended)
        if ended < batch:
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))


def log_expired(commit: Commit) -> None:
    """Log each lease this process's reaper ended (one line per limit of the lease), with its
    limit and holder: ``Backend.observe`` calls it with every commit of this process."""
    for event in commit.events:
        if event.cause != builders.EXPIRY:
            continue
        holder = next(
            (
                r["prefect.resource.id"]
                for r in event.related
                if r["prefect.resource.role"] != "concurrency-limit"
            ),
            None,
        )
        if holder is None and "task_run_id" in event.resource:  # a v1 hold
            holder = f"prefect.task-run.{event.resource['task_run_id']}"
        limit = event.resource.get("prefect.resource.name", event.resource_id)
        log.info(
            "lease expired: limit %r, holder %s, %s slot(s), reclaimed %.3f s after its expiry",
            limit,
            holder or "unknown",
            event.resource.get("slots-acquired", "1"),
            max(0.0, event.received - event.occurred),
            extra={"limit": limit, "holder": holder, "event_id": event.id},
        )
