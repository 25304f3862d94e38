"""slotkeeper's operator endpoints beside Prefect's limits (additive: Prefect's clients never call
them): the overview of many limits, one limit's queue and grant statistics, and ending a lease.

* ``POST /api/v2/concurrency_limits/overview``: a page of limits with their leased and pool
  slots and their queues (POST, as ``/filter``: a ``GET /overview`` would hide a limit named so);
* ``GET /api/v2/concurrency_limits/{id_or_name}/queue``: the requests waiting, in order;
* ``GET /api/v2/concurrency_limits/{id_or_name}/stats``: grants and wait-time percentiles per
  time bucket;
* ``DELETE /api/v2/concurrency_limits/leases/{lease_id}``: an operator ends a lease.

Reads go through :class:`~slotkeeper.storage.views.ViewStore` (no row locks); the ``*_json``
functions here are the wire shapes, shared with the live streams (:mod:`slotkeeper.api.live`).
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from slotkeeper.api import schemas
from slotkeeper.api.limits import LEASE_GONE, PREFIX, TAGS
from slotkeeper.api.responses import json_response
from slotkeeper.api.schemas import MAX_INT, Strict, iso
from slotkeeper.errors import InvalidRequest, LeaseGone
from slotkeeper.events import builders
from slotkeeper.models import GrantBucket, Holder, LimitState, LimitSummary, QueuedRequest
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from slotkeeper.storage.views import ViewStore

#: The longest window and the most buckets the statistics serve (a day, by minutes).
MAX_STATS_WINDOW_SECONDS = 86400.0
MAX_STATS_BUCKETS = 1440


def view_store(request: Request) -> ViewStore:
    """The views over this app's storage (stateless: made per request)."""
    storage: Storage = request.app.state.storage
    return storage.view_store()


class Overview(Strict):
    """Body of ``POST /api/v2/concurrency_limits/overview``."""

    limit: int | None = None
    offset: int = Field(default=0, ge=0, le=MAX_INT)
    prefix: str = Field(default="", max_length=1024, description="Only names that start with it.")


def _holder_json(holder: Holder | None) -> dict[str, str] | None:
    return {"type": holder.type, "id": holder.id} if holder else None


def summary_json(summary: LimitSummary, now: float) -> dict[str, Any]:
    """One limit of the overview. ``pool_slots`` is the pool decayed up to ``now``; with
    ``slot_decay_per_second`` and ``pool_clock`` (the instant the last whole slot left it), a
    reader computes it at any later instant as the server would: whole slots leave at that rate,
    ``floor((t - pool_clock) * rate)`` of them by ``t``. ``active_slots`` is pool + leased."""
    lim = summary.limit.settled(now)
    return {
        "id": lim.id,
        "name": lim.name,
        "limit": lim.limit,
        "active": lim.active,
        "slot_decay_per_second": lim.slot_decay_per_second,
        "rate_limit": lim.slot_decay_per_second > 0,
        "active_slots": lim.pool_slots + lim.leased_slots,
        "leased_slots": lim.leased_slots,
        "pool_slots": lim.pool_slots,
        "pool_clock": lim.pool_clock,
        "waiters": summary.waiters,
        "waiting_slots": summary.waiting_slots,
        "updated": iso(lim.updated),
    }


def queued_json(waiter: QueuedRequest) -> dict[str, Any]:
    """One request of a queue."""
    return {
        "position": waiter.position,
        "waiter_id": waiter.waiter_id,
        "priority": waiter.priority,
        "slots": waiter.slots,
        "enqueued": iso(waiter.enqueued),
        "deadline": iso(waiter.deadline),
        "holder": _holder_json(waiter.holder),
        "limits": waiter.limits,
    }


def state_json(state: LimitState) -> dict[str, Any]:
    """One limit with its holders and the head of its queue, as read at ``now``."""
    return {
        "now": state.now,
        "limit": summary_json(state.summary, state.now),
        "holders": [schemas.lease_json(h) for h in state.holders],
        "queue": [queued_json(w) for w in state.queue],
    }


def bucket_json(bucket: GrantBucket) -> dict[str, Any]:
    """One time bucket of the statistics."""
    return {
        "start": iso(bucket.start),
        "seconds": bucket.seconds,
        "grants": bucket.grants,
        "grants_per_second": bucket.grants / bucket.seconds if bucket.seconds > 0 else 0.0,
        "wait_seconds": {
            "p50": bucket.wait_p50,
            "p90": bucket.wait_p90,
            "p99": bucket.wait_p99,
            "max": bucket.wait_max,
        },
    }


def routers(settings: Settings) -> list[APIRouter]:
    """The operator routes, with this server's page size."""
    api = APIRouter(prefix=PREFIX, tags=TAGS)
    page_max = settings.api_default_limit

    def page(limit: int | None) -> int:
        return schemas.page_size(schemas.LimitFilter(limit=limit), page_max)

    @api.post("/overview", summary="A page of limits with leased and pool slots and waiters (slotkeeper)")
    async def overview(request: Request, body: Overview | None = None) -> Response:
        body = body or Overview()
        summaries, total, now = await view_store(request).overview(page(body.limit), body.offset, body.prefix)
        return json_response(
            {
                "now": now,
                "total": total,
                "offset": body.offset,
                "limits": [summary_json(s, now) for s in summaries],
            }
        )

    @api.get("/{id_or_name}/queue", summary="The requests waiting for a limit, in order (slotkeeper)")
    async def queue(
        request: Request, id_or_name: schemas.NameRef, limit: Annotated[int | None, Query()] = None
    ) -> Response:
        state = await view_store(request).state(id_or_name, page(limit))
        return json_response([queued_json(w) for w in state.queue])

    @api.get("/{id_or_name}/stats", summary="Grants and wait-time percentiles per time bucket (slotkeeper)")
    async def stats(
        request: Request,
        id_or_name: schemas.NameRef,
        window_seconds: Annotated[float, Query(gt=0, le=MAX_STATS_WINDOW_SECONDS)] = 3600.0,
        bucket_seconds: Annotated[float, Query(ge=1, le=MAX_STATS_WINDOW_SECONDS)] = 60.0,
    ) -> Response:
        if window_seconds / bucket_seconds > MAX_STATS_BUCKETS:
            raise InvalidRequest(
                f"window_seconds / bucket_seconds must not exceed {MAX_STATS_BUCKETS} buckets."
            )
        limit_id, buckets = await view_store(request).grant_stats(id_or_name, window_seconds, bucket_seconds)
        return json_response(
            {
                "limit_id": limit_id,
                "bucket_seconds": bucket_seconds,
                "buckets": [bucket_json(b) for b in buckets],
            }
        )

    @api.delete("/leases/{lease_id}", status_code=204, summary="End a lease as an operator (slotkeeper)")
    async def revoke(request: Request, lease_id: UUID) -> Response:
        storage: Storage = request.app.state.storage
        if not await storage.release_lease(str(lease_id), cause=builders.OPERATOR):
            raise LeaseGone(LEASE_GONE)
        return Response(status_code=204)

    return [api]
