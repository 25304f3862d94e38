"""Prefect's event REST API: ``/api/events``, ``/api/events/filter``, its next pages, count-by.

Routes only translate between the wire and :class:`~slotkeeper.storage.events.EventStore`
(found at ``app.state.events``). Shapes and status codes are Prefect's (reference §6.6):

* ``POST /events``: a JSON array of events; 204; any invalid event makes the whole batch 422.
  Unlike Prefect, an event over 1.5 MB is a 422 too (Prefect drops it silently after a 204).
* ``POST /events/filter``: ``{"filter", "limit"}`` → ``{"events", "total", "next_page"}``.
* ``GET /events/filter/next?page-token=``: the following page; a token that does not decode,
  or does not hold a valid frozen query, is a 403.
* ``POST /events/count-by/{day|time|event|resource}``.

The page token is Prefect's: base64 of the JSON ``{"filter", "count", "page_size", "offset"}``,
base64-encoded again for the URL (base64 of base64 text only uses ``A-Za-z0-9=``, so it needs
no escaping). The frozen filter has concrete ``since``/``until``, and ``count`` is the total of
the first query.
"""

from __future__ import annotations

import base64
import binascii

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slotkeeper.api.responses import json_response
from slotkeeper.events import filters
from slotkeeper.events.models import MAX_EVENT_SIZE_BYTES, Event, EventFilter, EventRecord
from slotkeeper.settings import Settings
from slotkeeper.storage.events import (
    Countable,
    EventStore,
    InvalidCountRequest,
    TimeUnit,
    unstorable,
)

#: The largest page ``POST /events/filter`` serves (Prefect's ``INTERACTIVE_PAGE_SIZE``).
PAGE_SIZE = 50
#: Offsets and counts in a token stay far below the databases' 64-bit integers.
MAX_TOKEN_NUMBER = 2**53
NEXT_PAGE_ROUTE = "read_events_next_page"

router = APIRouter(prefix="/events", tags=["Events"])


class FilterRequest(BaseModel):
    """Body of ``POST /api/events/filter``; unknown top-level keys are ignored, as Prefect."""

    filter: EventFilter | None = None
    limit: int = Field(default=PAGE_SIZE, ge=0, le=PAGE_SIZE)


class CountRequest(BaseModel):
    """Body of ``POST /api/events/count-by/{countable}``: the filter is required."""

    model_config = ConfigDict(allow_inf_nan=False)

    filter: EventFilter
    time_unit: TimeUnit = TimeUnit.day
    time_interval: float = Field(default=1.0, ge=0.01)


class InvalidPageToken(Exception):
    """A page token that does not hold a valid query (403)."""


def filter_bounds(settings: Settings) -> filters.FilterBounds:
    """The bounds of an events filter these settings set (``SLOTKEEPER_EVENTS_FILTER_*``)."""
    return filters.FilterBounds(
        max_values=settings.events_filter_max_values,
        max_resource_filters=settings.events_filter_max_resource_filters,
        max_string_length=settings.events_filter_max_string_length,
    )


def _checked(request: Request, event_filter: EventFilter) -> EventFilter:
    """``event_filter``, or :class:`~slotkeeper.events.filters.FilterTooLarge` (422)."""
    filters.check_bounds(event_filter, filter_bounds(request.app.state.settings))
    return event_filter


def _store(request: Request) -> EventStore:
    store: EventStore = request.app.state.events
    return store


def _invalid(index: int, message: str, event: Event) -> RequestValidationError:
    """A 422 in Prefect's validation shape, pointing at the event, without echoing it."""
    error = {"type": "value_error", "loc": ("body", index), "msg": message, "input": {"id": str(event.id)}}
    return RequestValidationError([error], body=None)


# --- page tokens (pure) ---------------------------------------------------------------------------


def page_token(event_filter: EventFilter, count: int, page_size: int, offset: int) -> str | None:
    """The URL token of the page at ``offset``, or None when there is none (Prefect's rule).

    The token is base64 twice, as Prefect's. Unlike Prefect, a page size of 0 has no next page
    (it would never advance).
    """
    if page_size <= 0 or offset >= count:
        return None
    inner = {
        "filter": event_filter.model_dump(mode="json"),
        "count": count,
        "page_size": page_size,
        "offset": offset,
    }
    return base64.b64encode(base64.b64encode(orjson.dumps(inner))).decode()


def read_page_token(outer: str) -> tuple[EventFilter, int, int, int]:
    """Decode an URL token into (filter, count, page_size, offset), or :class:`InvalidPageToken`.

    Tokens are not signed, so everything is checked again; the page size cannot be raised
    above :data:`PAGE_SIZE`.
    """
    try:
        inner = base64.b64decode(outer, validate=True)
        if not inner:
            raise InvalidPageToken("empty token")
        token = orjson.loads(base64.b64decode(inner, validate=True))
        count, size, offset = token["count"], token["page_size"], token["offset"]
        if not all(type(n) is int and 0 <= n <= MAX_TOKEN_NUMBER for n in (count, size, offset)):
            raise InvalidPageToken("count, page size and offset must be small natural numbers")
        if size > PAGE_SIZE:
            raise InvalidPageToken(f"the page size is at most {PAGE_SIZE}")
        return EventFilter.model_validate(token["filter"]), count, size, offset
    except (binascii.Error, ValueError, TypeError, KeyError, ValidationError) as exc:
        raise InvalidPageToken(str(exc)) from None


def _next_page(request: Request, token: str | None) -> str | None:
    if token is None:
        return None
    return f"{request.url_for(NEXT_PAGE_ROUTE)}?page-token={token}"


def _page(request: Request, events: list[EventRecord], total: int, token: str | None) -> Response:
    return json_response(
        {"events": [e.wire() for e in events], "total": total, "next_page": _next_page(request, token)}
    )


# --- routes ---------------------------------------------------------------------------------------


@router.post("", status_code=204, summary="Record a batch of events")
async def create_events(request: Request, events: list[Event]) -> Response:
    store = _store(request)
    received = store.clock()
    records = []
    for index, event in enumerate(events):
        size = len(event.model_dump_json().encode())  # bytes, as Prefect's ``size_bytes``
        if size > MAX_EVENT_SIZE_BYTES:
            message = f"Event is {size} bytes; the limit is {MAX_EVENT_SIZE_BYTES} bytes"
            raise _invalid(index, message, event)
        record = EventRecord.from_event(event, received)
        problem = unstorable(record)
        if problem:
            raise _invalid(index, problem, event)
        records.append(record)
    await store.ingest(records)
    return Response(status_code=204)


@router.post("/filter", summary="The first page of events matching a filter")
async def read_events(request: Request, body: FilterRequest | None = None) -> Response:
    body = body or FilterRequest()
    store = _store(request)
    event_filter = filters.with_defaults(_checked(request, body.filter or EventFilter()), store.clock())
    events, total = await store.query(event_filter, body.limit, 0)
    return _page(request, events, total, page_token(event_filter, total, body.limit, body.limit))


@router.get("/filter/next", name=NEXT_PAGE_ROUTE, summary="The next page of a filter")
async def read_events_next_page(request: Request, token: str = Query(alias="page-token")) -> Response:
    try:
        event_filter, count, size, offset = read_page_token(token)
        # Tokens are not signed: one this server issued held a filter within the bounds.
        filters.check_bounds(event_filter, filter_bounds(request.app.state.settings))
    except (InvalidPageToken, filters.FilterTooLarge):
        return json_response({"detail": "Forbidden", "code": "invalid_page_token"}, 403)
    events, _ = await _store(request).query(event_filter, size, offset, with_total=False)
    return _page(request, events, count, page_token(event_filter, count, size, offset + size))


@router.post("/count-by/{countable}", summary="Count events by day, time, name or resource")
async def count_events(request: Request, countable: Countable, body: CountRequest) -> Response:
    store = _store(request)
    event_filter = filters.with_defaults(_checked(request, body.filter), store.clock())
    try:
        counts = await store.count_by(countable, event_filter, body.time_unit, body.time_interval)
    except InvalidCountRequest as exc:
        return json_response({"detail": str(exc), "code": "invalid_request"}, 422)
    return json_response([c.wire() for c in counts])
