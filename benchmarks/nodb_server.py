"""slotkeeper's server with no database work: the floor of the protocol, for the SDK benchmark.

What it is: the real application (``create_app``: the same routes, hot path, validation, error
rendering, websocket session, auth and middleware) over a :class:`~slotkeeper.storage.Storage`
whose acquire, release and renew answer at once from memory: every acquisition is granted with
a fresh lease id, every release and renewal succeeds. Nothing is written, nothing is checked,
no event exists, nobody waits. It is not a concurrency-limit server; it measures what the rest
of the stack (HTTP or the session, JSON, asyncio, the SDK's client) costs around the storage, so
``benchmarks/sdk_vs_redis.py`` can show which share of the gap to Redis is the database's.

Run it as uvicorn runs slotkeeper::

    python -m uvicorn nodb_server:create --factory --app-dir benchmarks --port N --loop uvloop --http httptools
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any

from fastapi import FastAPI

from slotkeeper.api.app import create_app
from slotkeeper.domain import Limit
from slotkeeper.models import AcquireRequest, Granted
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, migrate
from slotkeeper.storage.sqlite import SQLiteBackend


class NoDatabase(Storage):
    """Acquire, release and renew without a database (everything else as the real storage, on
    an empty SQLite database the server never writes on the hot path)."""

    def __init__(self, path: str) -> None:
        super().__init__(SQLiteBackend(path))
        self._limits: dict[str, Limit] = {}

    def _limit(self, name: str) -> Limit:
        found = self._limits.get(name)
        if found is None:
            now = time.time()
            found = self._limits[name] = Limit(
                id=str(uuid.uuid4()),
                name=name,
                limit=1000,
                active=True,
                pool_slots=0,
                pool_clock=now,
                leased_slots=0,
                slot_decay_per_second=0.0,
                denied_slots=0,
                avg_slot_occupancy_seconds=0.0,
                fencing_token=1,
                created=now,
                updated=now,
            )
        return found

    async def acquire(self, request: AcquireRequest) -> Granted:
        return Granted([self._limit(name) for name in request.names], str(uuid.uuid4()))

    async def release_lease(self, lease_id: str) -> bool:
        return True

    async def renew_lease(self, lease_id: str, duration: float) -> bool:
        return True

    async def reap_expired(self, batch: int = 500) -> int:
        return 0

    async def sweep_waiters(self) -> int:
        return 0


def create() -> FastAPI:
    """The app, over :class:`NoDatabase` in a scratch folder (``SLOTKEEPER_HOME`` if set)."""
    home = os.environ.get("SLOTKEEPER_HOME") or tempfile.mkdtemp(prefix="slotkeeper-nodb-")
    path = os.path.join(home, "nodb.db")
    migrate(f"sqlite:///{path}")
    app: Any = create_app(Settings(home=home), storage=NoDatabase(path))
    return app
