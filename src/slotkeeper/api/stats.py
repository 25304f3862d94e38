"""``POST /api/v2/concurrency_limits/stats`` (slotkeeper): the busiest limits, as they are now.

Every limit's limit, slots held by leases, slots in its pool and queued requests, read in one
statement (:func:`slotkeeper.storage.stats.read_limit_stats`), busiest first (slots in use plus
waiters, then name), a page of them (``limit``, ``offset``: as ``/filter``), with the number of
limits in all. What ``slotkeeper limit top`` shows; an addition Prefect's clients never call.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from slotkeeper.api import schemas
from slotkeeper.api.responses import json_response
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from slotkeeper.storage.stats import read_limit_stats


def router(settings: Settings) -> APIRouter:
    """The route, with this server's page size."""
    api = APIRouter(prefix="/v2/concurrency_limits", tags=["Concurrency Limits V2"])

    @api.post("/stats", summary="The busiest limits now (slotkeeper)")
    async def stats(request: Request, body: schemas.LimitFilter | None = None) -> Response:
        body = body or schemas.LimitFilter()
        size = schemas.page_size(body, settings.api_default_limit)
        storage: Storage = request.app.state.storage
        found = sorted(await read_limit_stats(storage), key=lambda s: (-s.busy, s.name))
        page = found[body.offset : body.offset + size]
        return json_response(
            {
                "total": len(found),
                "limits": [
                    {
                        "id": s.id,
                        "name": s.name,
                        "limit": s.limit,
                        "active": s.active,
                        "leased_slots": s.leased_slots,
                        "pool_slots": s.pool_slots,
                        "waiters": s.waiters,
                    }
                    for s in page
                ],
            }
        )

    return api
