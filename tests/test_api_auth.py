"""HTTP basic auth (Prefect's ``PREFECT_SERVER_API_AUTH_STRING``) through the real ASGI app.

With ``api_auth_string`` set, every request needs ``Authorization: Basic base64(auth string)``,
except GET on the health and ready probes; anything else answers 401
``{"exception_message": "Unauthorized"}`` before a route runs, so it changes nothing.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage

V2 = "/v2/concurrency_limits"
UNAUTHORIZED = {"exception_message": "Unauthorized", "code": "unauthorized"}
LEASE = "0b6b2f4e-8c0a-4a55-9b5c-3a8c1c2f8f10"


def basic(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


@pytest.fixture
async def http(storage: Storage, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client, sending no credentials of its own, on an app that requires ``user:pass``."""
    app = create_app(Settings(home=tmp_path, api_auth_string="user:pass"), storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as client:
            yield client


GOOD = basic(b"user:pass")

#: One valid request per route (so only auth can refuse it), and its status once authorised.
REQUESTS: list[tuple[str, str, Any, int]] = [
    ("POST", f"{V2}/", {"name": "new", "limit": 1}, 201),
    ("GET", f"{V2}/db", None, 200),
    ("GET", f"{V2}/db/leases", None, 200),
    ("POST", f"{V2}/filter", {}, 200),
    ("PATCH", f"{V2}/db", {"limit": 9}, 204),
    ("POST", f"{V2}/increment", {"names": ["db"], "slots": 1}, 200),
    ("POST", f"{V2}/increment-with-lease", {"names": ["db"], "slots": 1}, 200),
    ("POST", f"{V2}/decrement", {"names": ["db"], "slots": 1}, 200),
    ("POST", f"{V2}/decrement-with-lease", {"lease_id": LEASE}, 204),
    ("POST", f"{V2}/leases/{LEASE}/renew", None, 410),  # authorised; the lease is unknown
    ("GET", "/admin/version", None, 200),
    ("GET", "/csrf-token?client=x", None, 422),  # authorised; CSRF protection is off
    ("GET", "/openapi.json", None, 200),
    ("DELETE", f"{V2}/db", None, 204),
]

BAD_CREDENTIALS = [
    pytest.param({}, id="none"),
    pytest.param(basic(b"user:wrong"), id="wrong-password"),
    pytest.param(basic(b"admin:pass"), id="wrong-user"),
    pytest.param(basic(b"user:pass "), id="trailing-space"),
    pytest.param({"Authorization": "Bearer " + base64.b64encode(b"user:pass").decode()}, id="bearer"),
    pytest.param({"Authorization": base64.b64encode(b"user:pass").decode()}, id="no-scheme"),
    pytest.param({"Authorization": "Basic user:pass"}, id="not-base64"),
    pytest.param({"Authorization": "Basic"}, id="empty"),
]


async def setup_limit(http: httpx.AsyncClient) -> None:
    r = await http.post(f"{V2}/", json={"name": "db", "limit": 2}, headers=GOOD)
    assert r.status_code == 201, r.text


async def snapshot(http: httpx.AsyncClient) -> Any:
    r = await http.post(f"{V2}/filter", headers=GOOD)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("headers", BAD_CREDENTIALS)
async def test_every_route_answers_401_without_the_right_credentials_and_changes_nothing(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    await setup_limit(http)
    before = await snapshot(http)
    for method, path, body, _ in REQUESTS:
        r = await http.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, path)
        assert r.json() == UNAUTHORIZED, (method, path)
        assert r.headers["content-type"] == "application/json"
    assert await snapshot(http) == before


async def test_every_route_works_with_the_right_credentials(http: httpx.AsyncClient) -> None:
    await setup_limit(http)
    for method, path, body, status in REQUESTS:
        r = await http.request(method, path, json=body, headers=GOOD)
        assert r.status_code == status, (method, path, r.text)


async def test_httpx_basic_auth_is_accepted(http: httpx.AsyncClient) -> None:
    r = await http.post(f"{V2}/", json={"name": "db", "limit": 1}, auth=("user", "pass"))
    assert r.status_code == 201
    r = await http.get(f"{V2}/db", auth=("user", "pass"))
    assert r.json()["name"] == "db"


async def test_a_refused_create_creates_nothing(http: httpx.AsyncClient) -> None:
    r = await http.post(f"{V2}/", json={"name": "sneaky", "limit": 1}, headers=basic(b"user:nope"))
    assert r.status_code == 401
    assert (await http.get(f"{V2}/sneaky", headers=GOOD)).status_code == 404


@pytest.mark.parametrize(("path", "answer"), [("/health", True), ("/ready", {"message": "OK"})])
async def test_health_and_ready_are_open_to_get(http: httpx.AsyncClient, path: str, answer: Any) -> None:
    r = await http.get(path)
    assert r.status_code == 200
    assert r.json() == answer
    r = await http.get(path, headers=basic(b"user:wrong"))
    assert r.status_code == 200


async def test_only_get_on_the_probes_is_open(http: httpx.AsyncClient) -> None:
    r = await http.post("/health")
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED
    assert (await http.post("/health", headers=GOOD)).status_code == 405


async def test_an_authorised_invalid_request_still_gets_its_422(http: httpx.AsyncClient) -> None:
    r = await http.post(f"{V2}/", json={"name": "a/b", "limit": 1}, headers=GOOD)
    assert r.status_code == 422
    assert r.json()["exception_message"] == "Invalid request received."


async def test_auth_is_checked_before_the_body_cap(storage: Storage, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api_auth_string="user:pass", max_body_bytes=1024)
    app = create_app(settings, storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as client:
            big = {"name": "x" * 2000, "limit": 1}
            assert (await client.post(f"{V2}/", json=big)).status_code == 401
            assert (await client.post(f"{V2}/", json=big, headers=GOOD)).status_code == 413
