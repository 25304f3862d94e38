"""The async API client against the real app served over real HTTP (uvicorn, in this process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from starlette.types import Receive, Scope, Send

from slotkeeper.api.app import create_app
from slotkeeper.client import SlotkeeperClient, limit_path
from slotkeeper.errors import ApiError, ServerUnreachable
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import basic_auth, free_port, serving
from tests.test_wire import FakeProxy
from tests.test_wire import serving as serving_raw

AUTH = "admin:s3cret"
LEASES = "/v2/concurrency_limits/increment-with-lease"


@pytest.fixture
async def api_url(storage: Storage, tmp_path: Path) -> AsyncIterator[str]:
    """The real app over each storage backend, without auth."""
    settings = Settings(home=tmp_path, api_auth_string=None)
    async with serving(create_app(settings, storage=storage), ws="none", http="httptools") as url:
        yield url


@pytest.fixture
async def sk(api_url: str) -> AsyncIterator[SlotkeeperClient]:
    async with SlotkeeperClient(api_url) as client:
        yield client


async def test_limit_lifecycle(sk: SlotkeeperClient) -> None:
    created = await sk.create_limit("db", 2, active_slots=1, slot_decay_per_second=0.5)
    assert created["name"] == "db"
    assert created["limit"] == 2
    assert created["active"] is True
    assert created["active_slots"] == 1
    assert created["slot_decay_per_second"] == 0.5
    assert {"denied_slots", "avg_slot_occupancy_seconds"} <= created.keys()

    by_name = await sk.read_limit("db")
    assert by_name == await sk.read_limit(created["id"])
    assert by_name["id"] == created["id"]

    assert await sk.update_limit("db", limit=5, active=False, active_slots=0) is None
    updated = await sk.read_limit("db")
    assert (updated["limit"], updated["active"], updated["active_slots"]) == (5, False, 0)

    await sk.update_limit("db", active=True)
    assert await sk.list_leases("db") == []
    holder = {"type": "task_run", "id": "6f1c2a4e-1111-4a7b-9c1d-2e3f4a5b6c7d"}
    granted = await sk.request("POST", LEASES, {"names": ["db"], "slots": 2, "holder": holder})
    (lease,) = await sk.list_leases("db")
    assert lease["lease_id"] == granted["lease_id"]
    assert lease["holder"] == holder
    assert lease["slots"] == 2
    assert lease["fencing_token"] == granted["limits"][0]["fencing_token"]
    assert (await sk.read_limit("db"))["active_slots"] == 2

    assert await sk.delete_limit("db") is None
    with pytest.raises(ApiError) as missing:
        await sk.read_limit("db")
    assert (missing.value.status, missing.value.detail) == (404, "Concurrency Limit not found")


async def test_names_are_encoded_in_paths(sk: SlotkeeperClient) -> None:
    for name in ["a b", "q?x=1", "h#x", "ü:c", ".", "..", "[red]x", "a+b", "tag:x"]:
        created = await sk.create_limit(name, 1)
        assert (await sk.read_limit(name))["id"] == created["id"], name
        await sk.update_limit(name, limit=4)
        assert (await sk.read_limit(name))["limit"] == 4, name
        assert await sk.list_leases(name) == [], name
        await sk.delete_limit(name)
        with pytest.raises(ApiError, match="404"):
            await sk.read_limit(created["id"])


async def test_list_limits_pages_by_name(sk: SlotkeeperClient) -> None:
    for name in ("c", "a", "d", "b"):
        await sk.create_limit(name, 1)
    assert [lim["name"] for lim in await sk.list_limits()] == ["a", "b", "c", "d"]
    assert [lim["name"] for lim in await sk.list_limits(limit=2, offset=1)] == ["b", "c"]
    assert [lim["name"] for lim in await sk.list_limits(limit=None, offset=3)] == ["d"]
    with pytest.raises(ApiError) as too_big:
        await sk.list_limits(limit=10_000)
    assert too_big.value.status == 422
    assert too_big.value.detail == "Invalid limit: must be less than or equal to 200."


async def test_duplicate_name_is_409(sk: SlotkeeperClient) -> None:
    await sk.create_limit("db", 1)
    with pytest.raises(ApiError) as clash:
        await sk.create_limit("db", 3)
    assert clash.value.status == 409
    assert "already exists" in clash.value.detail


async def test_validation_errors_read_field_colon_message(sk: SlotkeeperClient) -> None:
    with pytest.raises(ApiError) as one:
        await sk.create_limit("db", -1)
    assert one.value.status == 422
    assert one.value.detail == "limit: Input should be greater than or equal to 0"

    with pytest.raises(ApiError) as two:
        await sk.create_limit("a/b", -1)
    assert two.value.detail == (
        "name: String should match pattern '^[^/%&><]+$'; limit: Input should be greater than or equal to 0"
    )
    assert str(two.value).startswith("422: name: ")


async def test_health(sk: SlotkeeperClient) -> None:
    assert await sk.health() is True


async def test_basic_auth(storage: Storage, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api_auth_string=AUTH)
    async with serving(create_app(settings, storage=storage), ws="none", http="httptools") as url:
        async with SlotkeeperClient(url) as anonymous:
            assert await anonymous.health() is True  # health is open, as on Prefect
            with pytest.raises(ApiError) as refused:
                await anonymous.list_limits()
            assert (refused.value.status, refused.value.detail) == (401, "Unauthorized")
        async with SlotkeeperClient(url, auth_string="admin:wrong") as wrong:
            with pytest.raises(ApiError):
                await wrong.create_limit("db", 1)
        async with SlotkeeperClient(url, auth_string=AUTH) as admin:
            await admin.create_limit("db", 1)
            assert [lim["name"] for lim in await admin.list_limits()] == ["db"]


async def test_unreachable_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    async with SlotkeeperClient(url) as client:
        with pytest.raises(ServerUnreachable) as down:
            await client.read_limit("db")
        assert url in str(down.value)
        assert isinstance(down.value.__cause__, aiohttp.ClientConnectionError)
        assert await client.health() is False


async def test_silent_server_times_out() -> None:
    hung_up = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with SlotkeeperClient(f"http://127.0.0.1:{port}/api", timeout=0.2) as client:
            with pytest.raises(ServerUnreachable, match=r"No answer from .* within 0\.2 s"):
                await client.list_limits()
        await hung_up.wait()  # the server side closes its socket before the loop ends


async def test_error_body_that_is_not_json() -> None:
    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/html")]}
        )
        await send({"type": "http.response.body", "body": b"<h1>Bad gateway</h1>"})

    async with serving(proxy, ws="none", http="httptools") as url, SlotkeeperClient(url) as client:
        with pytest.raises(ApiError) as bad:
            await client.read_limit("db")
        assert (bad.value.status, bad.value.detail) == (502, "<h1>Bad gateway</h1>")


async def test_closed_client_reopens(api_url: str) -> None:
    client = SlotkeeperClient(api_url + "/")  # a trailing slash is dropped
    assert client.base_url == api_url
    try:
        assert await client.list_limits() == []
        await client.close()
        assert await client.health() is True
    finally:
        await client.close()


@pytest.mark.parametrize("url", ["127.0.0.1:4200/api", "ftp://host/api", "http://"])
def test_rejects_urls_that_are_not_http(url: str) -> None:
    with pytest.raises(ValueError, match="Not an API URL"):
        SlotkeeperClient(url)


def test_limit_path() -> None:
    assert limit_path("a b/c?#%") == "/v2/concurrency_limits/a%20b%2Fc%3F%23%25"
    assert limit_path("..") == "/v2/concurrency_limits/%2E%2E"
    with pytest.raises(ValueError):
        limit_path("")


async def test_proxies_from_the_environment(api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # As other Python clients: HTTP_PROXY for http:// URLs (with the proxy's credentials from its
    # URL), NO_PROXY to go direct.
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    proxy = FakeProxy()
    async with serving_raw(proxy.handle) as proxy_port:
        monkeypatch.setenv("HTTP_PROXY", f"http://me:secret@127.0.0.1:{proxy_port}")
        async with SlotkeeperClient("http://slotkeeper.invalid:4200/api", AUTH) as client:
            assert await client.request("GET", "/v2/concurrency_limits/db") == {"lease_id": "x"}
        ((line, headers),) = proxy.requests
        assert line == "GET http://slotkeeper.invalid:4200/api/v2/concurrency_limits/db HTTP/1.1"
        assert headers["proxy-authorization"] == basic_auth("me:secret")
        assert headers["authorization"] == basic_auth(AUTH)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with SlotkeeperClient(api_url) as client:
        assert await client.health() is True
