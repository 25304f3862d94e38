"""The hot routes served ahead of FastAPI's stack (slotkeeper.api.hotpath) answer as FastAPI would."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slotkeeper.api.app import App, create_app
from slotkeeper.api.hotpath import HotPaths
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
