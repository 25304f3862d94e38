"""The gateway's HTTP forwarding (gateway/proxy.py, gateway/__init__.py) against a fake upstream.

The gateway is slotkeeper's real app served by uvicorn in this process (over the ``storage``
fixture: SQLite and PostgreSQL), with ``upstream_url`` pointing at an aiohttp server of the test
(tests/gateway_fake.py). Tests against a real Prefect server are in tests/gateway/.

Nothing is timed: timeouts are set small only where a timeout is what is tested, and every wait
is bounded so that a broken gateway fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.gateway import GatewayState
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import free_port, serving
from tests.gateway_fake import CHUNK, FakeUpstream, fake_upstream

BOUND = aiohttp.ClientTimeout(total=30)  # a bound on a broken gateway, never an expectation


@dataclass
class Gateway:
    url: str  # the gateway's http://127.0.0.1:PORT/api
    upstream: FakeUpstream
    http: aiohttp.ClientSession
    state: GatewayState

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.request(method, self.url + path, **kwargs) as response:
            body = await response.read()
            try:
                data = await response.json(content_type=None) if body else None
            except ValueError:
                data = body
            return response.status, data, response


@contextlib.asynccontextmanager
async def gateway_on(
    storage: Storage, tmp_path: Path, upstream_url: str, upstream: FakeUpstream, **overrides: Any
) -> AsyncIterator[Gateway]:
    settings = Settings(home=tmp_path, upstream_url=upstream_url, **overrides)
    app = create_app(settings, storage=storage)
    async with serving(app) as url, aiohttp.ClientSession(timeout=BOUND) as http:
        yield Gateway(url, upstream, http, app.state.gateway)


@pytest.fixture
async def gateway(storage: Storage, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with fake_upstream() as upstream, gateway_on(storage, tmp_path, upstream.url, upstream) as served:
        yield served


def _headers(seen: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in seen["headers"]}


async def test_a_request_goes_through_with_its_method_path_query_and_end_to_end_headers(
    gateway: Gateway,
) -> None:
    host = gateway.url.removeprefix("http://").removesuffix("/api")
    status, seen, response = await gateway.call(
        "PATCH",
        "/echo/a%20b/c%2Fd?x=1&x=2&y=%C3%A9",
        headers={
            "Authorization": "Basic dXNlcjpwYXNz",
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Named",
            "X-Named": "named by Connection: hop-by-hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic secret",
            "TE": "trailers",
            "X-Forwarded-For": "10.0.0.1",
        },
    )
    assert status == 200
    assert seen["method"] == "PATCH"
    assert seen["raw_path"] == "/api/echo/a%20b/c%2Fd?x=1&x=2&y=%C3%A9"
    headers = _headers(seen)
    assert headers["authorization"] == "Basic dXNlcjpwYXNz"
    assert headers["x-custom"] == "kept"
    for hop in ("x-named", "keep-alive", "proxy-authorization", "te"):
        assert hop not in headers, hop
    assert headers["host"] == host  # the client's: Prefect builds links from it
    assert headers["x-forwarded-host"] == host
    assert headers["x-forwarded-proto"] == "http"
    assert (
        headers["x-forwarded-for"] == "10.0.0.1"
    )  # uvicorn trusts its loopback peer: the client is 10.0.0.1
    # The answer's end-to-end headers come back; its hop-by-hop ones do not.
    assert response.headers["X-Upstream"] == "yes"
    assert "X-Private" not in response.headers
    assert "X-Request-ID" in response.headers  # the gateway's own access layer still runs


async def test_status_and_error_answers_of_the_upstream_come_back_unchanged(gateway: Gateway) -> None:
    for wanted in (201, 204, 404, 409, 422, 500):
        status, _, _ = await gateway.call("POST", f"/echo/x?status={wanted}", json={"a": 1})
        assert status == wanted


async def test_bodies_small_and_large_arrive_whole(gateway: Gateway) -> None:
    small = b'{"name": "flow"}'
    status, seen, _ = await gateway.call(
        "POST", "/echo/flows/", data=small, headers={"Content-Type": "application/json"}
    )
    assert status == 200
    assert (seen["size"], seen["sha256"], seen["chunked"]) == (
        len(small),
        hashlib.sha256(small).hexdigest(),
        False,
    )
    assert _headers(seen)["content-type"] == "application/json"

    large = bytes(range(256)) * 8192 * 4  # 8 MiB: streamed, never held whole by the gateway
    status, seen, _ = await gateway.call("PUT", "/echo/blob", data=io.BytesIO(large))
    assert status == 200
    assert (seen["size"], seen["sha256"], seen["chunked"]) == (
        len(large),
        hashlib.sha256(large).hexdigest(),
        True,
    )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield CHUNK

    status, seen, _ = await gateway.call("POST", "/echo/stream", data=chunks())
    assert (seen["size"], seen["chunked"]) == (3 * len(CHUNK), True)


async def test_a_larger_body_than_slotkeepers_own_cap_is_the_upstreams_business(
    storage: Storage, tmp_path: Path
) -> None:
    async with (
        fake_upstream() as upstream,
        gateway_on(storage, tmp_path, upstream.url, upstream, max_body_bytes=1024) as gw,
    ):
        status, seen, _ = await gw.call("POST", "/echo/big", data=b"y" * 4096)
        assert (status, seen["size"]) == (200, 4096)
        status, body, _ = await gw.call("POST", "/v2/concurrency_limits/", data=b"y" * 4096)
        assert (status, body["code"]) == (413, "body_too_large")  # slotkeeper's own routes keep it


async def test_a_streamed_answer_arrives_whole(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/stream?chunks=16") as response:
        assert response.status == 200
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == 16 * len(CHUNK)


async def test_next_page_links_point_at_the_gateway(gateway: Gateway) -> None:
    status, page, _ = await gateway.call("POST", "/events/filter", json={})
    assert status == 200
    assert page["next_page"].startswith(gateway.url + "/events/filter/next?")


async def test_slotkeeper_answers_concurrency_itself_and_the_upstream_never_sees_it(gateway: Gateway) -> None:
    status, _, _ = await gateway.call("POST", "/v2/concurrency_limits/", json={"name": "db", "limit": 1})
    assert status == 201
    status, lease, _ = await gateway.call(
        "POST", "/v2/concurrency_limits/increment-with-lease", json={"names": ["db"], "slots": 1}
    )
    assert status == 200
    status, _, _ = await gateway.call(
        "POST", "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease["lease_id"]}
    )
    assert status == 204
    status, _, _ = await gateway.call(
        "POST", "/concurrency_limits/", json={"tag": "t", "concurrency_limit": 1}
    )
    assert status == 201
    for path in ("/health", "/ready"):
        assert (await gateway.call("GET", path))[0] == 200
    assert (await gateway.call("GET", "/v2/concurrency_limits/no/such/route"))[0] == 404
    assert gateway.upstream.requests == []
    # ...and in the same process, everything else does reach it.
    assert (await gateway.call("GET", "/echo/flows"))[0] == 200
    assert len(gateway.upstream.requests) == 1


async def test_upstream_down_forwarded_routes_answer_502_and_concurrency_keeps_working(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    async with gateway_on(storage, tmp_path, dead, FakeUpstream()) as gw:
        with caplog.at_level(logging.WARNING, logger="slotkeeper.gateway"):
            status, body, _ = await gw.call("POST", "/flow_runs/", json={})
        assert status == 502
        assert body["code"] == "upstream_unavailable"
        assert "cannot be reached" in body["detail"] and dead.removesuffix("/api") in body["detail"]
        lines = [r for r in caplog.records if r.name == "slotkeeper.gateway"]
        assert len(lines) == 1 and "POST /api/flow_runs/" in lines[0].getMessage()

        assert (await gw.call("POST", "/v2/concurrency_limits/", json={"name": "db", "limit": 1}))[0] == 201
        status, _, _ = await gw.call(
            "POST", "/v2/concurrency_limits/increment-with-lease", json={"names": ["db"], "slots": 1}
        )
        assert status == 200
        # Prefect's client asks for a CSRF token before its first POST: answered here.
        status, token, _ = await gw.call("GET", "/csrf-token?client=abc")
        assert status == 200 and token["client"] == "abc" and token["token"]


async def test_upstream_slow_forwarded_routes_answer_504_within_the_timeout(
    storage: Storage, tmp_path: Path
) -> None:
    async with (
        fake_upstream() as upstream,
        gateway_on(storage, tmp_path, upstream.url, upstream, upstream_timeout_seconds=0.2) as gw,
    ):
        status, body, _ = await gw.call("GET", "/hang")
        assert status == 504
        assert body["code"] == "upstream_timeout"
        assert "did not answer within 0.2 s" in body["detail"]


async def test_an_answer_cut_midway_is_not_passed_off_as_complete(gateway: Gateway) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with gateway.http.get(gateway.url + "/cut") as response:
            assert response.status == 200
            await response.read()


def _established_to(port: int) -> int:
    """TCP connections of this host to ``port``, established now (client ends, from /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":
                count += 1
    return count


def _live_client_responses(port: int) -> int:
    """The gateway's answers from the upstream still alive (the test's own are to another port)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, aiohttp.ClientResponse) and o.url.port == port)


async def test_many_failed_forwards_leave_no_connection_task_or_response_behind(
    storage: Storage, tmp_path: Path
) -> None:
    async with (
        fake_upstream() as upstream,
        gateway_on(storage, tmp_path, upstream.url, upstream, upstream_timeout_seconds=0.05) as gw,
    ):
        assert (await gw.call("GET", "/echo/warm"))[0] == 200
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        responses_before = _live_client_responses(upstream.port)

        async def timed_out() -> None:
            assert (await gw.call("GET", "/hang"))[0] == 504

        for _ in range(10):  # 500 timeouts, 50 at a time
            await asyncio.gather(*(timed_out() for _ in range(50)))
        await upstream.stop()  # and 500 refused connections
        for _ in range(10):
            statuses = await asyncio.gather(*(gw.call("GET", "/echo/x") for _ in range(50)))
            assert {s for s, _, _ in statuses} == {502}

        gc.collect()
        assert _established_to(upstream.port) == 0
        assert len(asyncio.all_tasks()) <= tasks_before
        assert _live_client_responses(upstream.port) <= responses_before
        connector = gw.state.upstream.session.connector
        assert connector is not None
        assert len(connector._acquired) == 0  # type: ignore[attr-defined]


PREFLIGHT = {"Origin": "http://ui.example:4200", "Access-Control-Request-Method": "POST"}


async def test_browsers_cross_origin_calls_get_the_upstreams_cors_or_prefects_default(
    storage: Storage, tmp_path: Path
) -> None:
    """Prefect's UI calls the gateway from the upstream's origin: preflights of forwarded paths are
    the upstream's (before auth, as on Prefect's server), slotkeeper's routes get CORS headers."""
    async with (
        fake_upstream() as upstream,
        gateway_on(storage, tmp_path, upstream.url, upstream, api_auth_string="u:p") as gw,
    ):
        status, _, response = await gw.call("OPTIONS", "/flows/", headers=PREFLIGHT)
        assert (status, response.headers["X-Upstream"]) == (200, "yes")
        assert response.headers["Access-Control-Allow-Origin"] == "http://ui.example:4200"

        status, _, response = await gw.call("OPTIONS", "/v2/concurrency_limits/filter", headers=PREFLIGHT)
        assert status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert len(upstream.requests) == 1  # slotkeeper's own preflight stayed here

        auth = {"Origin": "http://ui.example:4200", "Authorization": "Basic dTpw"}
        status, _, response = await gw.call("POST", "/v2/concurrency_limits/filter", json={}, headers=auth)
        assert (status, response.headers["Access-Control-Allow-Origin"]) == (200, "*")
        status, _, response = await gw.call(
            "POST", "/v2/concurrency_limits/filter", json={}, headers=PREFLIGHT
        )
        assert (status, response.headers["Access-Control-Allow-Origin"]) == (401, "*")  # readable refusal
        # A forwarded answer carries the upstream's CORS headers only (the fake sets none here).
        status, _, response = await gw.call("GET", "/echo/x", headers=auth)
        assert status == 200 and "Access-Control-Allow-Origin" not in response.headers
        # Forwarded requests are still checked against the gateway's auth string.
        assert (await gw.call("GET", "/echo/x"))[0] == 401


async def test_a_lease_slotkeeper_does_not_hold_is_renewed_on_the_upstream(gateway: Gateway) -> None:
    """Deployment concurrency: the upstream takes the lease itself, the flow run renews it through
    the gateway (and stops if that fails)."""
    deployments = "7f7c3e1a-3d6b-4f1e-9a51-0c2a3b4d5e6f"
    gateway.upstream.leases.add(deployments)
    renew = "/v2/concurrency_limits/leases/{}/renew"
    body = {"lease_duration": 300}
    assert (await gateway.call("POST", renew.format(deployments), json=body))[0] == 204
    assert gateway.upstream.requests[-1]["size"] == len(b'{"lease_duration": 300}')

    # slotkeeper's own leases are renewed here, and the upstream never hears of them.
    await gateway.call("POST", "/v2/concurrency_limits/", json={"name": "db", "limit": 1})
    status, lease, _ = await gateway.call(
        "POST", "/v2/concurrency_limits/increment-with-lease", json={"names": ["db"], "slots": 1}
    )
    asked = len(gateway.upstream.requests)
    assert (await gateway.call("POST", renew.format(lease["lease_id"]), json=body))[0] == 204
    assert len(gateway.upstream.requests) == asked

    # Nobody's lease: the upstream's 410 (it was asked).
    status, answer, _ = await gateway.call("POST", renew.format(uuid.uuid4()), json=body)
    assert (status, answer["detail"]) == (410, "Lease not found - upstream")
    assert len(gateway.upstream.requests) == asked + 1


async def test_renewing_an_upstream_lease_while_the_upstream_is_down_says_so(
    storage: Storage, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    async with gateway_on(storage, tmp_path, dead, FakeUpstream()) as gw:
        status, answer, _ = await gw.call(
            "POST", f"/v2/concurrency_limits/leases/{uuid.uuid4()}/renew", json={"lease_duration": 300}
        )
        assert (status, answer["code"]) == (502, "upstream_unavailable")  # retried by Prefect's client
