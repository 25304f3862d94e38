"""Serve the hot routes (acquire, release, renew, health) ahead of FastAPI's middleware stack.

Under load, a request that goes through FastAPI spends most of its CPU in the layers around the
endpoint: the error middleware, the exception middleware, the exit-stack middleware, FastAPI's own
body-limit and telemetry middlewares, and route matching over nested routers (measured with
py-spy at 64 clients: about 40 % of the server's CPU, against 3 % in the endpoints). The
acquire/release path needs none of it: its routes are :class:`~slotkeeper.api.fastroute.FastRoute`
handlers that validate their own input and return a ``Response``.

:class:`HotPaths` is a plain ASGI app. It finds a hot route by method and exact path (or the
route's own path pattern, for a path parameter), calls the route's handler, and renders any
exception with the app's error table (:func:`slotkeeper.api.errors.render`), so the answers are the
same as through the full stack. Every other request goes to FastAPI unchanged. Auth and the body
cap wrap both paths (see :func:`slotkeeper.api.app.create_app`).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from starlette.convertors import Convertor
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from slotkeeper.api import errors
from slotkeeper.api.fastroute import FastRoute

#: The scope key where the full path template of the hot route that serves a request is put.
ROUTE_TEMPLATE = "slotkeeper.route"
#: Scope key set (True) on the requests a session carries (``api/session.py``): their client's
#: departure is known at once, with no transport closing in between (see ``limits._wait``).
CARRIED = "slotkeeper.carried"


class HotPaths:
    """Dispatch ``FastRoute`` routes directly; pass everything else to ``fallback``."""

    def __init__(self, routes: list[tuple[str, FastRoute]], fallback: ASGIApp) -> None:
        """``routes``: each hot route with its full path (the prefixes of its routers included).

        It runs inside the app's ``__call__``, which has set ``scope["app"]`` already.
        """
        self.fallback = fallback
        self.exact: dict[tuple[str, str], tuple[FastRoute, str]] = {}
        self.patterns: list[
            tuple[str, re.Pattern[str], dict[str, Convertor[Any]], tuple[FastRoute, str]]
        ] = []
        for path, route in routes:
            regex, _, convertors = compile_path(path)
            for method in route.methods or ():
                if convertors:
                    self.patterns.append((method, regex, convertors, (route, path)))
                else:
                    self.exact[(method, path)] = (route, path)

    def match(self, method: str, path: str) -> tuple[tuple[FastRoute, str], dict[str, Any]] | None:
        """The hot route for this request (with its full path) and its path parameters, or None."""
        route = self.exact.get((method, path))
        if route is not None:
            return route, {}
        for wanted, pattern, convertors, route in self.patterns:
            if wanted == method and (found := pattern.match(path)) is not None:
                return route, {k: convertors[k].convert(v) for k, v in found.groupdict().items()}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self.match(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if matched is None:
            await self.fallback(scope, receive, send)
            return
        (route, template), params = matched
        scope["path_params"] = params
        scope[ROUTE_TEMPLATE] = template  # for the access log and metrics (see api/access.py)
        request = Request(scope, receive, send)
        try:
            response = await route.handler(request)
        except Exception as exc:  # rendered as FastAPI's stack would (a bug is a logged 500)
            response = await errors.render(request, exc)
        await response(scope, receive, send)
