"""The ASGI application: routes, error handlers, middleware, and the storage's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from slotkeeper import __version__
from slotkeeper.api import admin, errors, events, limits, tags, websockets
from slotkeeper.api.middleware import BasicAuth, BodyLimit
from slotkeeper.domain import RetryPolicy
from slotkeeper.events.broker import Broker
from slotkeeper.reaper import run_reaper
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, migrate, open_storage
from slotkeeper.storage.dialect import Commit
from slotkeeper.storage.events import EventStore, run_retention


def retry_policy(settings: Settings) -> RetryPolicy:
    """The Retry-After policy these settings describe."""
    return RetryPolicy(
        max_wait=settings.maximum_slot_wait_seconds, tag_max_wait=settings.tag_slot_wait_seconds
    )


def create_app(settings: Settings | None = None, storage: Storage | None = None) -> FastAPI:
    """Build the app. Without ``storage``, it migrates and opens the configured database.

    The lifespan also starts the reaper and the event retention job, and connects the storage's
    committed events to the live broker (websocket subscribers).
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = storage is None
        if storage is None:
            url = settings.resolved_database_url
            await asyncio.to_thread(migrate, url)
            app.state.storage = await asyncio.to_thread(
                open_storage, url, pool_size=settings.pool_size, retry_policy=retry_policy(settings)
            )
        else:
            app.state.storage = storage
        store: Storage = app.state.storage
        broker = Broker(settings.events_subscriber_queue_size)
        app.state.broker = broker
        app.state.events = EventStore(store.backend, store.clock)
        loop = asyncio.get_running_loop()

        def publish(commit: Commit | None) -> None:  # called from a storage thread
            events = None if commit is None else commit.events
            if events == []:
                return
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                loop.call_soon_threadsafe(broker.publish, events)

        unsubscribe = store.backend.subscribe(publish)
        jobs = [
            asyncio.create_task(
                run_reaper(store, settings.reaper_interval_seconds, settings.reaper_batch_size),
                name="slotkeeper-reaper",
            ),
            asyncio.create_task(
                run_retention(
                    app.state.events,
                    settings.events_retention_seconds,
                    settings.events_retention_interval_seconds,
                ),
                name="slotkeeper-retention",
            ),
        ]
        try:
            yield
        finally:
            for job in jobs:
                job.cancel()
            for job in jobs:
                with contextlib.suppress(asyncio.CancelledError):
                    await job
            unsubscribe()
            if owned:
                await app.state.storage.close()

    app = FastAPI(
        title="slotkeeper",
        version=__version__,
        description="Named concurrency limits with durable leases; speaks Prefect's API.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(admin.router, prefix="/api")
    app.include_router(limits.router(settings), prefix="/api")
    app.include_router(tags.router(settings), prefix="/api")
    app.include_router(events.router, prefix="/api")
    app.include_router(websockets.router, prefix="/api")
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_auth_string:
        app.add_middleware(BasicAuth, auth_string=settings.api_auth_string)
    return app
