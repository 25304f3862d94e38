"""Gateway mode: slotkeeper in front of a Prefect server (``SLOTKEEPER_UPSTREAM_URL``).

slotkeeper answers concurrency (and its own extensions) itself and forwards every other request
under ``/api`` to the upstream Prefect server: HTTP through one shared connection pool
(:mod:`~slotkeeper.gateway.proxy`), websockets frame by frame (:mod:`~slotkeeper.gateway.ws`).
:mod:`~slotkeeper.gateway.routes` says which is which; :mod:`~slotkeeper.gateway.csrf` answers
Prefect's CSRF token requests even while the upstream is down; :mod:`~slotkeeper.gateway.leases`
sends renewals of the upstream's own leases (deployment concurrency) on to it. :class:`Gateway` is the ASGI
dispatch, placed around slotkeeper's own app only when an upstream is set (docs/gateway.md).
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from slotkeeper.gateway.csrf import CsrfMirror
from slotkeeper.gateway.leases import is_renewal, renew
from slotkeeper.gateway.proxy import ROUTE_LABEL, Upstream, forward
from slotkeeper.gateway.routes import forwarded
from slotkeeper.gateway.ws import relay
from slotkeeper.settings import Settings

__all__ = ["Gateway", "GatewayFront", "GatewayState"]

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
        elif kind == "http" and is_renewal(scope):  # maybe a deployment's lease, the upstream's
            await renew(self.app, self.state.upstream, scope, receive, send)
        elif kind == "websocket" and forwarded(scope["path"]):
            await relay(self.state.upstream, scope, receive, send)
        else:
            await self.app(scope, receive, send)


class GatewayFront:
    """ASGI, outside auth: browsers' cross-origin requests, as the upstream Prefect server answers them.

    Prefect's UI is served by the upstream and calls the gateway's API from another origin
    (``PREFECT_UI_API_URL``), so its browser sends CORS preflights and expects CORS headers.
    A preflight of a forwarded path goes straight to the upstream, whose CORS policy answers it
    (before auth, as on Prefect's server: preflights carry no credentials). slotkeeper's own
    routes get Prefect's default policy, with the origins of ``SLOTKEEPER_CORS_ALLOWED_ORIGINS``
    (any method and header); forwarded answers carry the upstream's own CORS headers.
    """

    def __init__(self, app: ASGIApp, state: GatewayState, allowed_origins: list[str]) -> None:
        self.app = app
        self.state = state
        self.cors = CORSMiddleware(
            app, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif not forwarded(scope["path"]):
            await self.cors(scope, receive, send)
        elif scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        ):
            scope[_ROUTE_TEMPLATE] = ROUTE_LABEL
            await forward(self.state.upstream, scope, receive, send)
        else:
            await self.app(scope, receive, send)
