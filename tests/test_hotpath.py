"""The hot routes served ahead of FastAPI's stack (slotkeeper.api.hotpath) answer as FastAPI would."""

from __future__ import annotations

import inspect
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi import Body as Body_
from pydantic import BaseModel

from slotkeeper.api.app import App, create_app
from slotkeeper.api.fastroute import FastRoute
from slotkeeper.api.hotpath import HotPaths
from slotkeeper.models import LimitSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage

V2 = "/api/v2/concurrency_limits"
V1 = "/api/concurrency_limits"
LEASE = "0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e"

#: Every hot route, with a concrete path.
HOT = {
    ("GET", "/api/health"),
    ("POST", f"{V2}/increment"),
    ("POST", f"{V2}/increment-with-lease"),
    ("POST", f"{V2}/decrement"),
    ("POST", f"{V2}/decrement-with-lease"),
    ("POST", f"{V2}/leases/{LEASE}/renew"),
    ("POST", f"{V1}/increment"),
    ("POST", f"{V1}/decrement"),
}


def hot_paths(app: App) -> HotPaths:
    stack: Any = app.build_middleware_stack()
    while not isinstance(stack, HotPaths):
        stack = stack.app
    return stack


@pytest.fixture
async def app(storage: Storage, tmp_path: Path) -> AsyncIterator[App]:
    app = create_app(Settings(home=tmp_path), storage=storage)
    async with app.router.lifespan_context(app):
        yield app


async def answer(asgi: Any, method: str, path: str, content: bytes | None) -> tuple[int, Any]:
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        headers = {"content-type": "application/json"}
        response = await client.request(method, path, content=content, headers=headers)
        return response.status_code, response.json() if response.content else None


def test_the_hot_routes_are_these(storage: Storage, tmp_path: Path) -> None:
    dispatch = hot_paths(create_app(Settings(home=tmp_path), storage=storage))
    assert {(method, path) for method, path in HOT if dispatch.match(method, path) is not None} == HOT
    # Anything else goes to FastAPI: another method, a trailing slash, another route.
    for method, path in [
        ("GET", f"{V2}/increment"),
        ("POST", f"{V2}/increment/"),
        ("POST", f"{V2}/filter"),
        ("POST", f"{V2}/leases/{LEASE}/renew/x"),
        ("HEAD", "/api/health"),
    ]:
        assert dispatch.match(method, path) is None


@pytest.mark.parametrize(
    ("method", "path", "content"),
    [
        *[(m, p, b"{") for m, p in sorted(HOT) if m == "POST"],  # malformed JSON
        *[(m, p, b'{"names": ["db"], "slots": 1, "extra": 1}') for m, p in sorted(HOT) if m == "POST"],
        ("POST", f"{V2}/leases/not-a-uuid/renew", b'{"lease_duration": 60}'),
        ("POST", f"{V2}/leases/{LEASE}/renew", None),  # unknown lease: 410
        ("POST", f"{V2}/decrement-with-lease", f'{{"lease_id": "{LEASE}"}}'.encode()),
        ("POST", f"{V2}/increment", b'{"names": ["nope"], "slots": 0}'),
        ("GET", "/api/health", None),
    ],
)
async def test_a_hot_route_answers_exactly_as_through_fastapi(
    app: App, method: str, path: str, content: bytes | None
) -> None:
    fallback = hot_paths(app).fallback

    async def fastapi_only(scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = app  # as the app's __call__ does before its middleware stack
        await fallback(scope, receive, send)

    assert await answer(app, method, path, content) == await answer(fastapi_only, method, path, content)


async def test_a_bug_in_a_hot_route_is_a_logged_500_in_prefects_shape(
    app: App, storage: Storage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(storage, "acquire", broken)
    with caplog.at_level(logging.ERROR, logger="slotkeeper.api"):
        status, body = await answer(app, "POST", f"{V2}/increment", b'{"names": ["db"], "slots": 1}')
    assert (status, body) == (500, {"exception_message": "Internal Server Error", "code": "internal_error"})
    assert "a bug" in caplog.text


async def test_a_hot_route_reaches_the_storage(app: App, storage: Storage) -> None:
    name = f"hot-{uuid.uuid4().hex[:8]}"
    assert (await answer(app, "POST", f"{V2}/", f'{{"name": "{name}", "limit": 1}}'.encode()))[0] == 201
    status, body = await answer(
        app, "POST", f"{V2}/increment-with-lease", f'{{"names": ["{name}"], "slots": 1}}'.encode()
    )
    assert status == 200
    assert [lim["name"] for lim in body["limits"]] == [name]
    lease = body["lease_id"]
    assert (await answer(app, "POST", f"{V2}/leases/{lease}/renew", None))[0] == 204
    assert (await answer(app, "POST", f"{V2}/decrement-with-lease", f'{{"lease_id": "{lease}"}}'.encode()))[
        0
    ] == 204
    assert (await storage.read_limit(name)).active_slots == 0


# --- traps that fail loudly, and the switch --------------------------------------------------------


class Body(BaseModel):
    n: int


def _token() -> str:
    return "t"


@pytest.mark.parametrize(
    ("endpoint", "wrong"),
    [
        (lambda: _endpoint_with(q=(int, ...)), "query parameter 'q'"),
        (lambda: _endpoint_with(x=(str, Header())), "header parameter 'x'"),
        (lambda: _endpoint_with(token=(str, Depends(_token))), "dependency"),
        (lambda: _endpoint_with(a=(Body, ...), b=(Body, ...)), "several body parameters"),
        (
            lambda: _endpoint_with(raw=(dict[str, int], Body_(...))),
            "body parameter 'raw' that is not a pydantic model",
        ),
    ],
    ids=["query", "header", "depends", "two-bodies", "not-a-model"],
)
def test_a_fastroute_refuses_an_endpoint_it_would_serve_wrongly(endpoint: Any, wrong: str) -> None:
    router = APIRouter(route_class=FastRoute)
    with pytest.raises(TypeError, match=re.escape(wrong)):
        router.post("/x")(endpoint())


def test_router_dependencies_do_not_reach_a_fastroute_silently() -> None:
    router = APIRouter(route_class=FastRoute, dependencies=[Depends(_token)])
    with pytest.raises(TypeError, match="dependency"):
        router.post("/x")(_endpoint_with())


def _endpoint_with(**params: tuple[Any, Any]) -> Any:
    """An endpoint taking the Request and these ``name=(annotation, default)`` parameters."""

    async def endpoint(request: Request, **kwargs: Any) -> Response:
        return Response()

    parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
    for name, (annotation, default) in params.items():
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=inspect.Parameter.empty if default is ... else default,
            )
        )
    endpoint.__signature__ = inspect.Signature(parameters, return_annotation=Response)  # type: ignore[attr-defined]
    endpoint.__annotations__ = {
        "request": Request,
        **{n: a for n, (a, _) in params.items()},
        "return": Response,
    }
    return endpoint


class Passthrough:
    """ASGI middleware that counts the HTTP requests it sees."""

    seen = 0

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            Passthrough.seen += 1
        await self.app(scope, receive, send)


def test_middleware_and_dependencies_that_would_skip_the_hot_routes_are_refused(
    storage: Storage, tmp_path: Path
) -> None:
    app = create_app(Settings(home=tmp_path), storage=storage)
    with pytest.raises(RuntimeError, match="would not wrap the hot routes"):
        app.add_middleware(Passthrough)
    with pytest.raises(RuntimeError, match="would not wrap the hot routes"):

        @app.middleware("http")
        async def noop(request: Request, call_next: Any) -> Any:
            return await call_next(request)

    hot = APIRouter(route_class=FastRoute)
    hot.post("/extra")(_endpoint_with())
    with pytest.raises(TypeError, match="would not apply to the hot routes"):
        app.include_router(hot, dependencies=[Depends(_token)])


async def test_without_the_hot_path_fastapi_serves_every_route_and_its_middleware_applies(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(home=tmp_path, hot_path=False), storage=storage)
    assert app.hot_routes == []  # no FastRoute: FastAPI's APIRoute serves them
    app.add_middleware(Passthrough)
    monkeypatch.setattr(Passthrough, "seen", 0)
    async with app.router.lifespan_context(app):
        assert await answer(app, "GET", "/api/health", None) == (200, True)
        assert (await answer(app, "POST", f"{V2}/increment", b'{"names": ["x"], "slots": 1}'))[0] == 200
    assert Passthrough.seen == 2


@pytest.mark.parametrize(
    ("method", "path", "content"),
    [
        *[(m, p, b'{"names": ["db"], "slots": 1, "extra": 1}') for m, p in sorted(HOT) if m == "POST"],
        ("POST", f"{V2}/leases/not-a-uuid/renew", b'{"lease_duration": 60}'),
        ("POST", f"{V2}/leases/{LEASE}/renew", None),
        ("POST", f"{V2}/decrement-with-lease", f'{{"lease_id": "{LEASE}"}}'.encode()),
        ("POST", f"{V2}/increment", b'{"names": ["nope"], "slots": 0}'),
        ("POST", f"{V2}/increment", b'{"names": ["hot-db"], "slots": 2}'),
        ("POST", f"{V2}/increment-with-lease", b'{"names": ["hot-db"], "slots": 1, "lease_duration": 1}'),
        (
            "POST",
            f"{V1}/increment",
            b'{"names": ["db"], "task_run_id": "0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6f"}',
        ),
        ("GET", "/api/health", None),
    ],
)
async def test_the_switch_changes_the_route_not_the_answer(
    storage: Storage, tmp_path: Path, method: str, path: str, content: bytes | None
) -> None:
    """With ``hot_path`` off, FastAPI's own routes (dependency solving, its middleware stack) give
    the answers the hot path gives."""
    await storage.create_limit(LimitSpec("hot-db", 1))
    answers = []
    for hot_path in (True, False):
        app = create_app(Settings(home=tmp_path, hot_path=hot_path), storage=storage)
        async with app.router.lifespan_context(app):
            answers.append(await answer(app, method, path, content))
    assert answers[0] == answers[1]
