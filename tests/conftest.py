"""Shared fixtures: a storage on each backend, and an HTTP client on the real ASGI app.

PostgreSQL tests use the database named by ``SLOTKEEPER_TEST_POSTGRES_URL`` (default: the local
server's ``test`` database). In CI (``CI`` set) an unreachable PostgreSQL fails the run; elsewhere
those tests are skipped with the reason printed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from slotkeeper.api.app import create_app
from slotkeeper.domain import RetryPolicy
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, migrate, open_storage

POSTGRES_URL = os.environ.get("SLOTKEEPER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_TABLES = ("waiter_limits", "waiters", "event_resources", "events", "grants", "leases", "limits")


def _postgres_reason() -> str | None:
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL unreachable at {POSTGRES_URL}: {exc}".strip()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL URL, migrated once per session; skips (fails in CI) when unreachable."""
    reason = _postgres_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires PostgreSQL: {reason}")
        pytest.skip(reason)
    migrate(POSTGRES_URL)
    return POSTGRES_URL


def truncate_postgres(url: str) -> None:
    """Empty every slotkeeper table (tests start from nothing)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(_TABLES)} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'slotkeeper.db'}"
        migrate(url)
        yield url
    else:
        url = request.getfixturevalue("postgres_url")
        truncate_postgres(url)
        yield url


class FakeClock:
    """A clock tests move by hand: expiry and decay without sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def storage(database_url: str, clock: FakeClock) -> AsyncIterator[Storage]:
    """A :class:`Storage` on each backend, driven by the fake clock, with fixed jitter."""
    store = open_storage(database_url, retry_policy=RetryPolicy(rng=__import__("random").Random(7)))
    store.clock = clock
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, reaper_interval_seconds=0.05)


@pytest.fixture
async def client(storage: Storage, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the real ASGI app (lifespan run, reaper on) over ``storage``."""
    app = create_app(settings, storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            yield http
