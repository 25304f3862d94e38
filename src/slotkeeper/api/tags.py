"""Tag-based (v1) concurrency limits: ``/api/concurrency_limits``, wire-compatible with Prefect.

A tag limit is the global limit named ``tag:<tag>`` (see :mod:`slotkeeper.storage.tags`); these
routes only translate between Prefect's v1 wire shapes and :class:`~slotkeeper.storage.tags.TagStore`.
Where slotkeeper fixes Prefect's v1 defects (reset frees the slots, the filter pages over tag
limits only, an invalid tag or a negative limit is 422, the decrement names tags as the increment
does) the route says so; ``docs/tags.md`` lists every difference.
"""

from enum import Enum
from typing import Annotated, Any, cast
from uuid import UUID

from fastapi import APIRouter, Request, Response
from pydantic import AfterValidator, Field

from slotkeeper import domain
from slotkeeper.api import schemas
from slotkeeper.api.fastroute import hot_route_class
from slotkeeper.api.responses import json_response
from slotkeeper.domain import Limit
from slotkeeper.models import TagLimitView
from slotkeeper.settings import Settings
from slotkeeper.storage.tags import TAG_PREFIX, TagStore

PREFIX = "/concurrency_limits"
TAGS: list[str | Enum] = ["Concurrency Limits"]

#: A tag that forms a valid limit name ``tag:<tag>``: Prefect's name pattern, storable text.
Tag = Annotated[
    str,
    Field(min_length=1, max_length=1024 - len(TAG_PREFIX), pattern=domain.NAME_PATTERN),
    AfterValidator(schemas._storable),
    AfterValidator(schemas.not_blank),
]


class TagLimitCreate(schemas.Strict):
    """Body of ``POST /api/concurrency_limits/`` (Prefect's ``ConcurrencyLimitCreate``).

    Prefect accepts a negative ``concurrency_limit`` and answers 500 for a tag such as ``a/b``;
    both are 422 here.
    """

    tag: Tag
    concurrency_limit: int = Field(ge=0, le=schemas.MAX_INT)


class TagIncrement(schemas.Strict):
    """Body of ``POST /api/concurrency_limits/increment``."""

    names: list[schemas.NameRef]
    task_run_id: UUID


class TagDecrement(schemas.Strict):
    """Body of ``POST /api/concurrency_limits/decrement``.

    ``occupancy_seconds`` is what Prefect's v1 client sends; the server measures the hold itself.
    """

    names: list[schemas.NameRef]
    task_run_id: UUID
    occupancy_seconds: float | None = Field(default=None, description="Accepted and ignored.")


class TagReset(schemas.Strict):
    """Body of ``POST /api/concurrency_limits/tag/{tag}/reset``."""

    slot_override: list[UUID] | None = Field(
        default=None, description="Task runs that hold the tag after the reset (one slot each)."
    )


def tag_limit_json(view: TagLimitView) -> dict[str, Any]:
    """Prefect's v1 ``ConcurrencyLimit``: ``active_slots`` are the task runs holding the tag."""
    lim = view.limit
    return {
        "id": lim.id,
        "created": schemas.iso(lim.created),
        "updated": schemas.iso(lim.updated),
        "tag": view.tag,
        "concurrency_limit": lim.limit,
        "active_slots": view.holders,
    }


def minimal_tag_json(lim: Limit) -> dict[str, Any]:
    """``MinimalConcurrencyLimitResponse`` named by the tag (increment and decrement alike)."""
    return {"id": lim.id, "name": lim.name.removeprefix(TAG_PREFIX), "limit": lim.limit}


def routers(settings: Settings) -> list[APIRouter]:
    """The v1 routes, with this server's v1 hold lifetime and page size: the admin routes, and
    increment/decrement (served ahead of FastAPI's stack, see :mod:`slotkeeper.api.hotpath`)."""
    api = APIRouter(prefix=PREFIX, tags=TAGS)
    hot = APIRouter(prefix=PREFIX, tags=TAGS, route_class=hot_route_class(settings))
    page_max = settings.api_default_limit
    Increment = schemas.names_capped(TagIncrement, settings.max_names)
    Decrement = schemas.names_capped(TagDecrement, settings.max_names)

    def tags(request: Request) -> TagStore:
        return TagStore(request.app.state.storage, settings.v1_hold_ttl_seconds)

    @api.post("/", summary="Create or update a tag limit")
    async def upsert(request: Request, body: TagLimitCreate) -> Response:
        view, created = await tags(request).upsert(body.tag, body.concurrency_limit)
        return json_response(tag_limit_json(view), 201 if created else 200)

    @api.get("/{limit_id:uuid}", summary="Read a tag limit by id")
    async def read(request: Request, limit_id: UUID) -> Response:
        return json_response(tag_limit_json(await tags(request).read(str(limit_id))))

    @api.get("/tag/{tag}", summary="Read a tag limit by tag")
    async def read_tag(request: Request, tag: schemas.NameRef) -> Response:
        return json_response(tag_limit_json(await tags(request).read_tag(tag)))

    @api.post("/filter", summary="List tag limits, ordered by tag")
    async def filter_(request: Request, body: schemas.LimitFilter | None = None) -> Response:
        body = body or schemas.LimitFilter()
        views = await tags(request).list_limits(schemas.page_size(body, page_max), body.offset)
        return json_response([tag_limit_json(v) for v in views])

    @api.post("/tag/{tag}/reset", summary="Free every slot of a tag (optionally naming its holders)")
    async def reset(request: Request, tag: schemas.NameRef, body: TagReset | None = None) -> Response:
        override = None if body is None or body.slot_override is None else body.slot_override
        await tags(request).reset(tag, [str(i) for i in override or []])
        return json_response(None)

    @api.delete("/{limit_id:uuid}", summary="Delete a tag limit by id")
    async def delete(request: Request, limit_id: UUID) -> Response:
        await tags(request).delete(str(limit_id))
        return json_response(None)

    @api.delete("/tag/{tag}", summary="Delete a tag limit by tag")
    async def delete_tag(request: Request, tag: schemas.NameRef) -> Response:
        await tags(request).delete_tag(tag)
        return json_response(None)

    @hot.post("/increment", summary="Take a slot on each tag for a task run")
    async def increment(request: Request, body: Increment) -> Response:  # type: ignore[valid-type]
        wanted = cast(TagIncrement, body)
        held = await tags(request).acquire(wanted.names, str(wanted.task_run_id))
        return json_response([minimal_tag_json(lim) for lim in held])

    @hot.post("/decrement", summary="Release a task run's slots on these tags")
    async def decrement(request: Request, body: Decrement) -> Response:  # type: ignore[valid-type]
        freed = cast(TagDecrement, body)
        found = await tags(request).release(freed.names, str(freed.task_run_id))
        return json_response([minimal_tag_json(lim) for lim in found])

    return [api, hot]
