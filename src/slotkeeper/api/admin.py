"""What Prefect's client calls around the limits: health, readiness, version, CSRF token."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from slotkeeper.api.fastroute import hot_route_class
from slotkeeper.api.responses import json_response
from slotkeeper.gateway import GatewayState
from slotkeeper.gateway.proxy import forwarding_headers
from slotkeeper.settings import Settings

#: The Prefect API version slotkeeper speaks. Prefect's clients refuse another major version.
PREFECT_API_VERSION = "3.8.8"

router = APIRouter(tags=["Admin"])


async def health() -> Response:
    return json_response(True)


def hot_router(settings: Settings) -> APIRouter:
    """Health, probed often (orchestrators, load balancers): served ahead of FastAPI's stack."""
    hot = APIRouter(tags=["Admin"], route_class=hot_route_class(settings))
    hot.get("/health", summary="Liveness")(health)
    return hot


@router.get("/ready", summary="Readiness")
async def ready() -> Response:
    return json_response({"message": "OK"})


@router.get("/admin/version", summary="The Prefect API version spoken")
async def version() -> Response:
    return json_response(PREFECT_API_VERSION)


@router.get("/csrf-token", summary="CSRF token (protection is off, as on a default Prefect server)")
async def csrf_token(request: Request, client: str | None = None) -> Response:
    gateway: GatewayState | None = request.app.state.gateway
    if gateway is not None:  # the upstream's setting (slotkeeper.gateway.csrf)
        return await gateway.csrf.answer(
            client, forwarding_headers(request.scope), request.scope["query_string"]
        )
    return json_response({"detail": "CSRF protection is disabled.", "code": "csrf_disabled"}, 422)
