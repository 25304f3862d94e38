"""Global concurrency limits (v2): ``/api/v2/concurrency_limits``, wire-compatible with Prefect.

Routes only translate: wire body → :mod:`slotkeeper.models` request → storage → wire answer.
Every decision is in :mod:`slotkeeper.domain`, every transaction in :mod:`slotkeeper.storage`.
"""

import asyncio
from collections.abc import Coroutine
from enum import Enum
from typing import Any, cast
from uuid import UUID

from fastapi import APIRouter, Request, Response

from slotkeeper.api import schemas
from slotkeeper.api.fastroute import hot_route_class
from slotkeeper.api.responses import CLIENT_LEFT, LeaseAnswer, json_response, lost_already
from slotkeeper.errors import LeaseGone
from slotkeeper.models import AcquireRequest, Granted, Holder, LeaseSpec, LimitSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage

PREFIX = "/v2/concurrency_limits"
TAGS: list[str | Enum] = ["Concurrency Limits V2"]
LEASE_GONE = "Lease not found - it may have expired or been revoked"


def _storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def _wait(request: Request, acquiring: Coroutine[Any, Any, Granted]) -> Granted | None:
    """Await a waiting acquisition, or withdraw it if the client disconnects first.

    The body has been read, so the next ASGI message is the disconnect (over HTTP: the client
    closed or half-closed its connection, which :mod:`slotkeeper.api.protocol` reports in the turn
    it is seen; on a session: the request's ``CANCEL``). A disconnect cancels the storage call
    through a callback, which leaves the queue and releases a grant that raced the disconnect; a
    grant that completed in the same loop step as the disconnect is released here (and one whose
    client leaves after this, before it is written, by :class:`LeaseAnswer`).

    The acquisition is awaited directly (not through ``asyncio.wait``), so its grant reaches this
    handler one turn of the loop after the transaction that admitted it, the turn in which the
    releaser's answer is written too (issue 14, the hand-off): on a session both leave in one
    message, the grant first; over HTTP both in that turn.
    """
    task = asyncio.ensure_future(acquiring)
    gone = asyncio.ensure_future(_disconnected(request))

    def withdraw(watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled() and not task.done():
            task.cancel()

    gone.add_done_callback(withdraw)
    try:
        granted = await task
    except BaseException as exc:
        current = asyncio.current_task()
        withdrawn = (
            isinstance(exc, asyncio.CancelledError)
            and not (current is not None and current.cancelling())
            and gone.done()
            and not gone.cancelled()
        )
        if withdrawn:
            return None  # the client left: withdrawn, nothing held
        raise  # failed, or this handler is cancelled: the acquisition gave back its grant
    finally:
        gone.cancel()
    if (gone.done() and not gone.cancelled()) or lost_already(request.receive):
        if granted.lease_id is not None:  # nobody is there to hold it
            await _storage(request).release_lease(granted.lease_id)
        return None
    return granted


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def routers(settings: Settings) -> list[APIRouter]:
    """The v2 routes, with this server's lease bounds and page size: the admin routes, and the
    acquire/release path (served ahead of FastAPI's stack, see :mod:`slotkeeper.api.hotpath`)."""
    api = APIRouter(prefix=PREFIX, tags=TAGS)
    IncrementWithLease, RenewLease = schemas.lease_models(
        settings.lease_min_seconds, settings.lease_max_seconds, settings.max_wait_seconds
    )
    IncrementWithLease = schemas.names_capped(IncrementWithLease, settings.max_names)
    Increment = schemas.names_capped(schemas.Increment, settings.max_names)
    Decrement = schemas.names_capped(schemas.Decrement, settings.max_names)
    page_max = settings.api_default_limit
    hot = APIRouter(prefix=PREFIX, tags=TAGS, route_class=hot_route_class(settings))

    @api.post("/", status_code=201, summary="Create a limit")
    async def create(request: Request, body: schemas.LimitCreate) -> Response:
        view = await _storage(request).create_limit(LimitSpec(**body.model_dump()))
        return json_response(schemas.full_limit_json(view), 201)

    @api.get("/{id_or_name}", summary="Read a limit by id or name")
    async def read(request: Request, id_or_name: schemas.NameRef) -> Response:
        return json_response(schemas.limit_json(await _storage(request).read_limit(id_or_name)))

    @api.get("/{id_or_name}/leases", summary="List the live leases on a limit (slotkeeper)")
    async def leases(request: Request, id_or_name: schemas.NameRef) -> Response:
        infos = await _storage(request).list_leases(id_or_name)
        return json_response([schemas.lease_json(i) for i in infos])

    @api.post("/filter", summary="List limits, ordered by name")
    async def filter_(request: Request, body: schemas.LimitFilter | None = None) -> Response:
        body = body or schemas.LimitFilter()
        views = await _storage(request).list_limits(schemas.page_size(body, page_max), body.offset)
        return json_response([schemas.limit_json(v) for v in views])

    @api.patch("/{id_or_name}", status_code=204, summary="Update a limit")
    async def update(request: Request, id_or_name: schemas.NameRef, body: schemas.LimitUpdate) -> Response:
        changes = body.model_dump(exclude_unset=True)  # nulls are refused by the model
        await _storage(request).update_limit(id_or_name, changes)
        return Response(status_code=204)

    @api.delete("/{id_or_name}", status_code=204, summary="Delete a limit")
    async def delete(request: Request, id_or_name: schemas.NameRef) -> Response:
        await _storage(request).delete_limit(id_or_name)
        return Response(status_code=204)

    @hot.post("/increment", summary="Take slots without a lease")
    async def increment(request: Request, body: Increment) -> Response:  # type: ignore[valid-type]
        wanted = cast(schemas.Increment, body)
        granted = await _storage(request).acquire(AcquireRequest(wanted.names, wanted.slots, wanted.mode))
        return json_response([schemas.minimal_json(lim, fencing=True) for lim in granted.limits])

    @hot.post("/increment-with-lease", summary="Take slots under a lease")
    async def increment_with_lease(request: Request, body: IncrementWithLease) -> Response:  # type: ignore[valid-type]
        values: Any = body
        holder = values.holder
        lease = LeaseSpec(values.lease_duration, Holder(holder.type, str(holder.id)) if holder else None)
        rejoin = str(values.waiter_id) if values.waiter_id is not None else None
        wanted = AcquireRequest(
            values.names, values.slots, values.mode, lease, values.wait_seconds, values.priority, rejoin
        )
        if values.wait_seconds is None:
            granted: Granted | None = await _storage(request).acquire(wanted)
        else:
            granted = await _wait(request, _storage(request).acquire(wanted))
        if granted is None:  # the client left while waiting; the wait was withdrawn
            return Response(status_code=CLIENT_LEFT)
        content = {
            "lease_id": granted.lease_id,
            "limits": [schemas.minimal_json(lim, fencing=True) for lim in granted.limits],
        }
        if granted.lease_id is None:  # nothing exists to hold (Prefect's answer for missing names)
            return json_response(content)
        # Released instead of written if the client is gone by then (see LeaseAnswer).
        return LeaseAnswer(content, granted.lease_id, _storage(request).release_lease)

    @hot.post("/decrement", summary="Free slots taken without a lease")
    async def decrement(request: Request, body: Decrement) -> Response:  # type: ignore[valid-type]
        freed = cast(schemas.Decrement, body)
        found = await _storage(request).release_slots(freed.names, freed.slots, freed.occupancy_seconds)
        return json_response([schemas.minimal_json(lim) for lim in found])

    @hot.post("/decrement-with-lease", status_code=204, summary="Release a lease and its slots")
    async def decrement_with_lease(request: Request, body: schemas.DecrementWithLease) -> Response:
        await _storage(request).release_lease(str(body.lease_id))
        return Response(status_code=204)

    @hot.post("/leases/{lease_id}/renew", status_code=204, summary="Extend a live lease")
    async def renew(
        request: Request,
        lease_id: UUID,
        body: RenewLease | None = None,  # type: ignore[valid-type]
    ) -> Response:
        # Without a body Prefect renews for 300 s; kept inside this server's bounds.
        default = min(max(300.0, settings.lease_min_seconds), settings.lease_max_seconds)
        duration = default if body is None else body.lease_duration
        if not await _storage(request).renew_lease(str(lease_id), duration):
            raise LeaseGone(LEASE_GONE)
        return Response(status_code=204)

    return [api, hot]
