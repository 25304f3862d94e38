"""Live views as server-sent events (``text/event-stream``): what the dashboard listens to.

* ``GET /api/live/limits?offset=&limit=&prefix=``: ``overview`` messages, each the answer of
  ``POST /api/v2/concurrency_limits/overview`` for that page;
* ``GET /api/live/limits/{id_or_name}?backfill=&queue=``: ``state`` messages (the limit, its
  holders and the head of its queue), and one ``event`` message per event of that limit (its
  last ``backfill`` events first), then ``deleted`` when the limit is deleted.

A view is sent at once, then again whenever it changed: at most ``COALESCE_SECONDS`` after a
committed event that concerns it (events arriving meanwhile make one new view, not one each), and
otherwise every ``REFRESH_SECONDS`` if it changed without an event (a request joined or left a
queue; a lease expired before the reaper ended it). So a burst of thousands of events costs a
few reads, and a page of 50 limits among thousands costs one page read. Events come from the
same broker as Prefect's websocket (every process's commits, on PostgreSQL), subscribed to before
the first read, so nothing falls in between.

Server-sent events are plain HTTP GETs: they go through the same basic auth as the API (a browser
sends the credentials it holds for the page), and ``EventSource`` reconnects by itself. A stream
ends after ``STREAM_SECONDS`` (the browser reconnects within ``RETRY_MILLISECONDS``, and gets a
fresh view and the backfill again; it ignores events it has). uvicorn waits for open responses
when the server stops: the server's shutdown (:mod:`slotkeeper.api.server`) ends every stream at
once with :func:`end_streams`; the lifetime bounds the wait of a server run otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from starlette.responses import StreamingResponse

from slotkeeper.api import schemas
from slotkeeper.api.views import state_json, summary_json, view_store
from slotkeeper.errors import NotFound
from slotkeeper.events import builders
from slotkeeper.events.broker import Broker, Subscription
from slotkeeper.events.models import EventFilter, EventRecord
from slotkeeper.settings import Settings
from slotkeeper.storage.events import EventStore
from slotkeeper.storage.views import ViewStore

#: How long events that concern a view are gathered before it is read again.
COALESCE_SECONDS = 0.1
#: How often a view is read again without any event (it is sent only if it changed).
REFRESH_SECONDS = 1.0
#: A comment line is sent after this long without a message (proxies close silent connections).
KEEPALIVE_SECONDS = 15.0
#: How long one stream lasts before the browser reconnects (see the module's docstring).
STREAM_SECONDS = 60.0
RETRY_MILLISECONDS = 500
#: Most events of a limit sent when its stream starts, and most requests of its queue listed.
MAX_BACKFILL = 200

#: Events that may change which limits a page of the overview shows.
_LIFECYCLE = frozenset({builders.CREATED, builders.UPDATED, builders.DELETED})
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def message(kind: str, data: Any, event_id: str | None = None) -> bytes:
    """One server-sent event: its type, its JSON data (one line), and its id if it has one."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def end_streams(app: FastAPI) -> None:
    """End every live stream of ``app`` now (their browsers reconnect to whichever server
    answers): for a shutdown, which otherwise waits for them."""
    _closing(app).set()


def _closing(app: FastAPI) -> asyncio.Event:
    closing: asyncio.Event | None = getattr(app.state, "live_closing", None)
    if closing is None:
        closing = app.state.live_closing = asyncio.Event()
    return closing


class _Watch:
    """A subscription to the events that concern a view, which follows the view as it changes
    (``resources``) and survives the broker ending it (an overflow: then the view is read again)."""

    def __init__(self, broker: Broker, accepts: Callable[[EventRecord], bool]) -> None:
        self.broker = broker
        self.accepts = accepts
        self.subscription: Subscription = broker.subscribe(accepts)

    def close(self) -> None:
        self.broker.unsubscribe(self.subscription)

    async def changes(self, timeout: float, closing: asyncio.Event) -> list[EventRecord]:
        """The events that came, waiting up to ``timeout`` for the first and then
        ``COALESCE_SECONDS`` for more; empty after the timeout or once ``closing`` is set."""
        first: EventRecord | None = None
        waiting = asyncio.ensure_future(self.subscription.next())
        stop = asyncio.ensure_future(closing.wait())
        try:
            await asyncio.wait({waiting, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not waiting.done():
                waiting.cancel()  # a queue get that is cancelled loses nothing
        if waiting.done() and not waiting.cancelled():
            first = waiting.result()
        if first is None:
            if self.subscription.ended is not None:  # cut off: start again, and read the view
                self.close()
                self.subscription = self.broker.subscribe(self.accepts)
            return []
        await asyncio.sleep(COALESCE_SECONDS)
        events = [first]
        with contextlib.suppress(asyncio.QueueEmpty):
            while (record := self.subscription.get_nowait()) is not None:
                events.append(record)
        return events


async def _stream(views: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``views`` with the retry delay first and keep-alive comments between, until the stream's
    time is up or the app ends its streams."""
    yield f"retry: {RETRY_MILLISECONDS}\n\n".encode()
    loop = asyncio.get_running_loop()
    quiet = loop.time()
    async for chunk in views:
        if chunk:
            quiet = loop.time()
            yield chunk
        elif loop.time() - quiet >= KEEPALIVE_SECONDS:
            quiet = loop.time()
            yield b": keep-alive\n\n"


def _respond(views: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(_stream(views), media_type="text/event-stream", headers=_HEADERS)


def _resources(limit_id: str) -> set[str]:
    """The resource ids of one limit's events (v2 and v1)."""
    return {builders.limit_resource_id(limit_id), builders.v1_limit_resource_id(limit_id)}


async def _overviews(
    app: FastAPI, views: ViewStore, broker: Broker, limit: int, offset: int, prefix: str
) -> AsyncIterator[bytes]:
    """The overview of one page whenever it changed (an empty chunk when it did not)."""
    watched: set[str] = set()
    watch = _Watch(broker, lambda e: e.event in _LIFECYCLE or e.resource_id in watched)
    closing = _closing(app)
    loop = asyncio.get_running_loop()
    end = loop.time() + STREAM_SECONDS
    last = b""
    try:
        while not closing.is_set() and loop.time() < end:
            summaries, total, now = await views.overview(limit, offset, prefix)
            watched.clear()
            for s in summaries:
                watched.update(_resources(s.limit.id))
            page = {"total": total, "offset": offset, "limits": [summary_json(s, now) for s in summaries]}
            seen = orjson.dumps(page)
            yield message("overview", {"now": now, **page}) if seen != last else b""
            last = seen
            await watch.changes(min(REFRESH_SECONDS, end - loop.time()), closing)
    finally:
        watch.close()


async def _limit_views(
    app: FastAPI,
    views: ViewStore,
    store: EventStore,
    broker: Broker,
    limit_id: str,
    backfill: int,
    queue: int,
) -> AsyncIterator[bytes]:
    """One limit's state whenever it changed, and its events as they come."""
    resources = _resources(limit_id)
    watch = _Watch(broker, lambda e: e.resource_id in resources)
    closing = _closing(app)
    loop = asyncio.get_running_loop()
    end = loop.time() + STREAM_SECONDS
    last = b""
    try:
        sent: set[str] = set()
        if backfill:
            recent = EventFilter.model_validate(
                {
                    "resource": {"id": sorted(resources)},
                    "occurred": {"since": "1970-01-01T00:00:00Z", "until": "9999-12-31T00:00:00Z"},
                }
            )
            page, _ = await store.query(recent, backfill, with_total=False)
            for record in reversed(page):
                sent.add(record.id)
                yield message("event", record.wire(), record.id)
        events: list[EventRecord] = []
        while not closing.is_set() and loop.time() < end:
            for record in events:
                if record.id in sent:  # sent by the backfill already (only it may overlap)
                    sent.discard(record.id)
                else:
                    yield message("event", record.wire(), record.id)
            try:
                state = await views.state(limit_id, queue)
            except NotFound:
                yield message("deleted", {"id": limit_id})
                return
            body = state_json(state)
            seen = orjson.dumps({k: v for k, v in body.items() if k != "now"})
            yield message("state", body) if seen != last else b""
            last = seen
            events = await watch.changes(min(REFRESH_SECONDS, end - loop.time()), closing)
    finally:
        watch.close()


def routers(settings: Settings) -> list[APIRouter]:
    """The live routes, with this server's page size."""
    api = APIRouter(prefix="/live", tags=["Live views"])
    page_max = settings.api_default_limit

    @api.get("/limits", summary="The overview of a page of limits, live (server-sent events)")
    async def overview(
        request: Request,
        limit: Annotated[int | None, Query()] = None,
        offset: Annotated[int, Query(ge=0, le=schemas.MAX_INT)] = 0,
        prefix: Annotated[str, Query(max_length=1024)] = "",
    ) -> StreamingResponse:
        size = schemas.page_size(schemas.LimitFilter(limit=limit), page_max)
        app = request.app
        return _respond(_overviews(app, view_store(request), app.state.broker, size, offset, prefix))

    @api.get(
        "/limits/{id_or_name}", summary="One limit, its holders, queue and events, live (server-sent events)"
    )
    async def limit(
        request: Request,
        id_or_name: schemas.NameRef,
        backfill: Annotated[int, Query(ge=0, le=MAX_BACKFILL)] = 50,
        queue: Annotated[int | None, Query()] = None,
    ) -> StreamingResponse:
        size = schemas.page_size(schemas.LimitFilter(limit=queue), page_max)
        views = view_store(request)
        limit_id = (await views.state(id_or_name, 0)).summary.limit.id  # 404 before the stream
        app = request.app
        return _respond(
            _limit_views(app, views, app.state.events, app.state.broker, limit_id, backfill, size)
        )

    return [api]
