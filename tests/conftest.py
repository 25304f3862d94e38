"""Shared fixtures and helpers: a storage on each backend, an HTTP client on the real ASGI app,
databases of a test's own, and servers (a ``slotkeeper server start`` process, or the app served
by uvicorn in this process).

PostgreSQL tests use the database named by ``SLOTKEEPER_TEST_POSTGRES_URL`` (default: the local
server's ``test`` database). In CI (``CI`` set) an unreachable PostgreSQL fails the run; elsewhere
those tests are skipped with the reason printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import uvicorn

from slotkeeper.api.app import create_app
from slotkeeper.domain import Mode, RetryPolicy
from slotkeeper.models import AcquireRequest, Granted, Holder, LeaseSpec
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, migrate, open_storage

POSTGRES_URL = os.environ.get("SLOTKEEPER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_TABLES = (
    "waiter_limits",
    "waiters",
    "event_resources",
    "events",
    "grants",
    "leases",
    "limits",
    "outbox",
    "outbox_lease",
    "outbox_copies",
)


def _postgres_reason() -> str | None:
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL unreachable at {POSTGRES_URL}: {exc}".strip()
    return None


async def take(
    storage: Storage,
    *names: str,
    slots: int = 1,
    lease: float | None = 60.0,
    holder: Holder | None = None,
    mode: Mode = Mode.CONCURRENCY,
) -> Granted:
    """Acquire on ``storage`` (``"db"`` by default), under a lease unless ``lease`` is None."""
    spec = LeaseSpec(lease, holder) if lease is not None else None
    return await storage.acquire(AcquireRequest(list(names) or ["db"], slots, mode, spec))


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


@pytest.fixture
def private_postgres_url(postgres_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database of the test's own, dropped after it: what other tests'
    truncations of the shared one must never meet (server processes, long property runs)."""
    name = f"slotkeeper_private_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urlsplit(postgres_url)._replace(path=f"/{name}").geturl()
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_copies(directory: Path) -> Callable[[], str]:
    """A maker of fresh, migrated SQLite databases in ``directory`` (their URLs): each one a copy
    of a template migrated once, which is much quicker than migrating each."""
    template = directory / "template.db"
    migrate(f"sqlite:///{template}")
    count = iter(range(1_000_000))

    def fresh() -> str:
        path = directory / f"example-{next(count)}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return fresh


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


# --- servers --------------------------------------------------------------------------------------

_SCRIPT = Path(sys.executable).with_name("slotkeeper")
#: The installed console script, or the module when the package is not installed as a script.
SLOTKEEPER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "slotkeeper.cli"]
#: Bound on a server's start: for a slow machine, not an expectation.
STARTUP_SECONDS = 60.0


def free_port() -> int:
    """A TCP port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(prefixes: tuple[str, ...] = ("SLOTKEEPER_",), **extra: str) -> dict[str, str]:
    """This process's environment without the variables named ``<prefix>...``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def basic_auth(auth: str) -> str:
    """The ``Authorization`` header of an auth string (``user:password``), as Prefect sends it."""
    return "Basic " + base64.b64encode(auth.encode()).decode()


class ServerProcess:
    """``slotkeeper server start`` on a free port, with ``SLOTKEEPER_HOME=home`` (a SQLite database
    there unless ``settings`` name another) and no ``SLOTKEEPER_*`` setting but ``settings``.

    ``with ServerProcess(...) as server`` starts it and stops it at the end; a test may stop and
    start it again in between (same port, same home; the log is appended to).
    """

    def __init__(self, home: Path, **settings: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.auth = settings.get("SLOTKEEPER_API_AUTH_STRING")
        self.env = clean_env(SLOTKEEPER_HOME=str(home), PYTHONUNBUFFERED="1", **settings)
        self.process: subprocess.Popen[bytes] | None = None

    #: What failures call it; how long its start may take; whether it leads a process group.
    name = "the server"
    startup_seconds = STARTUP_SECONDS
    own_group = False

    def command(self) -> list[str]:
        return [*SLOTKEEPER, "server", "start", "--port", str(self.port), "--log-level", "warning"]

    def start(self) -> None:
        """Start it and wait until it is healthy (fails the test if it exits or never is)."""
        with self.log.open("ab") as out:
            self.process = process = subprocess.Popen(
                self.command(),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_group,
            )
        deadline = time.monotonic() + self.startup_seconds
        while not self.healthy():
            if process.poll() is not None:
                pytest.fail(f"{self.name} exited with {process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not answer on {self.url}:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """A new process on the same port and database (what a deploy or a crash does)."""
        self.stop()
        self.start()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return bool(json.loads(response.read()) is True)
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A direct HTTP call to the API (with the server's auth): the status and the JSON body."""
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = basic_auth(self.auth)
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def serving(
    app: Any, make: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server, **config: Any
) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free local port in this process (lifespan on); yield
    its ``/api`` URL. ``config``: more ``uvicorn.Config`` arguments (``ws``, ``http``); ``make``:
    the server class (slotkeeper's own, ``api.server.Server``, for its shutdown)."""
    sock = socket.socket()
    # Accepted sockets inherit this; without it the stdlib loop answers 40 ms late (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not server.started:
            if task.done():
                task.result()
                pytest.fail("uvicorn stopped before it started")
            if time.monotonic() > deadline:
                pytest.fail("uvicorn did not start")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.should_exit = True
        await task
        sock.close()
