"""The dashboard's pages: static files served by the server itself, under the API's auth.

``GET /dashboard`` is the one page (its views are chosen by the URL's fragment, so moving between
them reloads nothing); ``/dashboard/assets/...`` are its script, style and the vendored chart
library, committed as they are served (no build step). ``GET /`` leads there. The page gets its
data from the API (:mod:`slotkeeper.api.views`) and its updates from the live views
(:mod:`slotkeeper.api.live`). See docs/dashboard.md.

The page lives at ``/dashboard``, not ``/dashboard/``: a browser that signed in for a URL reuses
the credentials, without being asked, for the URLs below that URL's folder. The folder of
``/dashboard`` is ``/``, so the page's calls to ``/api/...`` carry them too.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

#: The folder of the committed static files.
STATIC = Path(__file__).resolve().parent.parent / "dashboard"
PAGE = "/dashboard"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> Response:
    return RedirectResponse(PAGE)


@router.get(PAGE)
async def page() -> Response:
    # Revalidated on every load: a new server version's page is never served from a stale cache.
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get(PAGE + "/")
async def page_folder() -> Response:
    return RedirectResponse(PAGE)


def install(app: FastAPI) -> None:
    """Serve the page and its assets on ``app``."""
    app.include_router(router)
    app.mount(PAGE + "/assets", StaticFiles(directory=STATIC), name="dashboard-assets")


def is_page(path: str) -> bool:
    """Whether ``path`` is one of the dashboard's (a browser is asked to sign in there)."""
    return path == "/" or path == PAGE or path.startswith(PAGE + "/")
