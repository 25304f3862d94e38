"""``GET /metrics``: Prometheus' text format (see :mod:`slotkeeper.metrics`).

Outside ``/api`` (where Prometheus looks by default) and outside the OpenAPI document. Behind
the API's basic auth like every other path, unless ``SLOTKEEPER_METRICS_OPEN`` opens it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from slotkeeper.metrics import CONTENT_TYPE, Metrics

PATH = "/metrics"

router = APIRouter()


@router.get(PATH, include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Every metric of this process, read now."""
    found: Metrics = request.app.state.metrics
    return Response(await found.scrape(), media_type=CONTENT_TYPE)
