"""GET /api/csrf-token in gateway mode (gateway/csrf.py): the upstream's setting, mirrored.

The mirror is driven by a fake clock against the fake upstream (tests/gateway_fake.py); the last
test goes through the gateway's real app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict

from slotkeeper.gateway import csrf
from slotkeeper.gateway.csrf import CsrfMirror, Setting
from slotkeeper.gateway.proxy import Upstream
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock, free_port
from tests.gateway_fake import FakeUpstream, fake_upstream
from tests.test_gateway_proxy import gateway_on

WALL = datetime(2026, 12, 7, 20, 0, tzinfo=UTC)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with fake_upstream() as fake:
        yield fake


async def _mirror(url: str, clock: FakeClock) -> AsyncIterator[CsrfMirror]:
    upstream = Upstream(Settings(upstream_url=url))
    await upstream.open()
    try:
        yield CsrfMirror(upstream, clock=clock, wall=lambda: WALL)
    finally:
        await upstream.close()


@pytest.fixture
async def mirror(upstream: FakeUpstream, clock: FakeClock) -> AsyncIterator[CsrfMirror]:
    async for made in _mirror(upstream.url, clock):
        yield made


async def _ask(mirror: CsrfMirror, client: str | None = "c1") -> tuple[int, dict[str, object]]:
    query = f"client={client}".encode() if client else b""
    answer = await mirror.answer(client, CIMultiDict(), query)
    return answer.status_code, orjson.loads(bytes(answer.body))


async def test_protection_off_upstream_is_answered_as_prefect_and_remembered(
    mirror: CsrfMirror, upstream: FakeUpstream, clock: FakeClock
) -> None:
    assert await _ask(mirror) == (422, {"detail": "CSRF protection is disabled.", "code": "csrf_disabled"})
    assert mirror.setting is Setting.DISABLED
    asked = len(upstream.requests)
    clock.advance(csrf.DISABLED_KEPT_SECONDS - 1)
    assert (await _ask(mirror))[0] == 422
    assert len(upstream.requests) == asked  # not asked again meanwhile
    clock.advance(1)
    assert (await _ask(mirror))[0] == 422
    assert len(upstream.requests) == asked + 1


async def test_protection_on_upstream_relays_its_own_token(
    mirror: CsrfMirror, upstream: FakeUpstream
) -> None:
    upstream.csrf_enabled = True
    status, token = await _ask(mirror, "c2")
    assert status == 200
    assert (token["token"], token["client"]) == ("upstream-token", "c2")
    assert mirror.setting is Setting.ENABLED
    assert upstream.requests[-1]["query"] == "client=c2"


async def test_upstream_unreachable_a_local_token_unless_protection_is_known_off(clock: FakeClock) -> None:
    async for mirror in _mirror(f"http://127.0.0.1:{free_port()}/api", clock):
        status, token = await _ask(mirror, "c3")
        assert status == 200
        assert token["client"] == "c3" and len(str(token["token"])) == 64
        assert token["expiration"] == "2026-12-07T20:01:00Z"  # LOCAL_TOKEN_SECONDS after now
        assert (await _ask(mirror, None))[1]["code"] == "invalid_request"  # `client` is required
        # Known off, then unreachable: still off.
        mirror.setting, mirror.seen_at = Setting.DISABLED, clock() - 10 * csrf.DISABLED_KEPT_SECONDS
        assert (await _ask(mirror))[0] == 422


async def test_after_a_failure_the_upstream_is_not_asked_again_for_a_while(
    upstream: FakeUpstream, mirror: CsrfMirror, clock: FakeClock
) -> None:
    upstream.csrf_enabled = True
    await upstream.stop()
    assert (await _ask(mirror))[0] == 200  # a local token
    await upstream.start(upstream.port)
    assert (await _ask(mirror))[1]["token"] != "upstream-token"  # not asked yet
    assert upstream.requests == []
    clock.advance(csrf.RETRY_AFTER_FAILURE_SECONDS)
    assert (await _ask(mirror))[1]["token"] == "upstream-token"


async def test_the_gateways_csrf_route_answers_from_the_mirror(storage: Storage, tmp_path: Path) -> None:
    async with (
        fake_upstream(csrf_enabled=True) as upstream,
        gateway_on(storage, tmp_path, upstream.url, upstream) as gw,
    ):
        status, token, _ = await gw.call(
            "GET", "/csrf-token?client=abc", headers={"Authorization": "Basic x"}
        )
        assert (status, token["token"]) == (200, "upstream-token")
        assert dict((k.lower(), v) for k, v in upstream.requests[-1]["headers"])["authorization"] == "Basic x"
