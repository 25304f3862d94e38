"""What Prefect's client calls around the limits: health, readiness, version, CSRF token."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from slotkeeper.api.fastroute import hot_route_class
from slotkeeper.api.responses import json_response
from slotkeeper.gateway import GatewayState
from slotkeeper.gateway.proxy import forwarding_headers
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage

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
async def ready(request: Request) -> Response:
    """OK, or 503 ``not_ready`` while a background loop keeps failing (``slotkeeper.supervisor``):
    the loops that fail and how often, in the detail."""
    storage: Storage | None = getattr(request.app.state, "storage", None)
    problems = storage.supervisor.problems() if storage is not None else {}
    if problems:
        failing = ", ".join(f"{name} ({count} failures)" for name, count in sorted(problems.items()))
        detail = f"Background loops keep failing: {failing}; see the server's log."
        return json_response({"detail": detail, "code": "not_ready", "failing": problems}, 503)
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
