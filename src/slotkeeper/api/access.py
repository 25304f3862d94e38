"""The outermost middleware: a request id per request, the access log, and request latency.

Every HTTP request gets an id: the client's ``X-Request-ID`` when it sends a usable one (1 to 128
visible ASCII characters), else one made here (a per-process random prefix and a counter: unique
across processes, and far cheaper than a UUID on the hot path). The id is echoed in the response's
``X-Request-ID``, and set in :data:`slotkeeper.logs.REQUEST_ID` while the request is handled, so
every log line of the request carries it. With the access log on (``SLOTKEEPER_ACCESS_LOG``), one
line per request goes to the ``slotkeeper.access`` logger when its answer is sent. With metrics
on, the request's duration is observed by route (the route's path template, never the raw path).

Plain ASGI, outside auth and the body cap: a refused request (401, 413) is logged and counted too.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slotkeeper.logs import REQUEST_ID

log = logging.getLogger("slotkeeper.access")

HEADER = b"x-request-id"
#: The route label of a request that matched no route (a 404, or refused before routing).
UNMATCHED = "unmatched"
_MAX_ID = 128

_prefix = os.urandom(4).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique across processes: 8 random hex digits, a dash, a counter."""
    return f"{_prefix}-{next(_counter):x}"


def _given(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == HEADER:
            if 0 < len(value) <= _MAX_ID and all(33 <= c <= 126 for c in value):
                return value.decode("ascii")
            return None
    return None


def route_of(scope: Scope) -> str:
    """The path template of the route that served the request (``UNMATCHED`` if none)."""
    hot: str | None = scope.get("slotkeeper.route")  # see slotkeeper.api.hotpath.ROUTE_TEMPLATE
    if hot is not None:
        return hot
    route: Any = scope.get("route")
    template = getattr(route, "path", None)
    regex = getattr(route, "path_regex", None)
    if not isinstance(template, str):
        return UNMATCHED
    if regex is None:
        return template
    # FastAPI may hand over the route as its router declared it, without the prefixes of the
    # routers that include it: put back the part of the path in front of what it matches.
    path: str = scope["path"]
    start = 0
    while not regex.match(path[start:]):
        start = path.find("/", start + 1)
        if start < 0:
            return template
    return path[:start] + template


class RequestLog:
    """Request id, access log line and latency observation around every HTTP request.

    ``observe(method, route, status, seconds)``: where the latency goes (None: metrics off).
    """

    def __init__(self, app: ASGIApp, *, access_log: bool, observe: Any = None) -> None:
        self.app = app
        self.access_log = access_log
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _given(scope["headers"]) or new_request_id()
        token = REQUEST_ID.set(request_id)
        status = 0
        echoed = (HEADER, request_id.encode("ascii"))

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, tracking_send)
        finally:
            seconds = time.perf_counter() - started
            # No answer started: the request failed before one (a bug: the server answers 500),
            # or the client left while it waited (499, as the route reports it).
            shown = status or 500
            if self.observe is not None:
                self.observe(scope["method"], route_of(scope), shown, seconds)
            if self.access_log:
                self._log(scope, shown, seconds, request_id)
            REQUEST_ID.reset(token)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float, request_id: str) -> None:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        target = path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        log.info(
            '%s "%s %s HTTP/%s" %d %.2fms',
            peer,
            scope["method"],
            target,
            scope.get("http_version", "1.1"),
            status,
            seconds * 1000,
            extra={
                "client": peer,
                "method": scope["method"],
                "path": target,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            },
        )
