"""Gateway mode: slotkeeper in front of a Prefect server (``SLOTKEEPER_UPSTREAM_URL``).

slotkeeper answers concurrency (and its own extensions) itself and forwards every other request
under ``/api`` to the upstream Prefect server: HTTP through one shared connection pool
(:mod:`~slotkeeper.gateway.proxy`), websockets frame by frame (:mod:`~slotkeeper.gateway.ws`).
:mod:`~slotkeeper.gateway.routes` says which is which; :mod:`~slotkeeper.gateway.csrf` answers
Prefect's CSRF token requests even while the upstream is down. :class:`Gateway` is the ASGI
dispatch, placed around slotkeeper's own app only when an upstream is set (docs/gateway.md).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from slotkeeper.gateway.csrf import CsrfMirror
from slotkeeper.gateway.proxy import ROUTE_LABEL, Upstream, forward
from slotkeeper.gateway.routes import forwarded
from slotkeeper.gateway.ws import relay
from slotkeeper.settings import Settings

__all__ = ["Gateway", "GatewayState"]

#: The scope key of the route template (slotkeeper.api.hotpath.ROUTE_TEMPLATE, for the access log).
_ROUTE_TEMPLATE = "slotkeeper.route"


class GatewayState:
    """What a gateway process keeps: the upstream (its session) and the CSRF mirror."""

    def __init__(self, settings: Settings) -> None:
        self.upstream = Upstream(settings)
        self.csrf = CsrfMirror(self.upstream)

    async def open(self) -> None:
        await self.upstream.open()

    async def close(self) -> None:
        await self.upstream.close()


class Gateway:
    """ASGI: requests under ``/api`` that slotkeeper does not answer go to the upstream.

    Everything else (slotkeeper's routes, paths outside ``/api``, the lifespan) goes to ``app``.
    """

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and forwarded(scope["path"]):
            scope[_ROUTE_TEMPLATE] = ROUTE_LABEL
            await forward(self.state.upstream, scope, receive, send)
        elif kind == "websocket" and forwarded(scope["path"]):
            await relay(self.state.upstream, scope, receive, send)
        else:
            await self.app(scope, receive, send)
