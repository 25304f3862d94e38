"""The ASGI application: routes, error handlers, middleware, and the storage's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route, compile_path
from starlette.types import ASGIApp

from slotkeeper import __version__
from slotkeeper.api import (
    admin,
    dashboard,
    errors,
    events,
    limits,
    live,
    openapi,
    stats,
    tags,
    views,
    websockets,
)
from slotkeeper.api import metrics as metrics_route
from slotkeeper.api import session as sessions
from slotkeeper.api.access import RequestLog
from slotkeeper.api.fastroute import FastRoute
from slotkeeper.api.hotpath import HotPaths
from slotkeeper.api.middleware import BasicAuth, BodyLimit
from slotkeeper.domain import RetryPolicy
from slotkeeper.events.broker import Broker
from slotkeeper.events.models import EventRecord
from slotkeeper.gateway import Gateway, GatewayFront, GatewayState
from slotkeeper.gateway.outbox import start_delivery
from slotkeeper.metrics import Metrics
from slotkeeper.reaper import REAPER, log_expired, run_reaper
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage, migrate, open_storage
from slotkeeper.storage.events import RETENTION, run_retention

API_PREFIX = "/api"


#: Allocations (less deallocations) between two collections of the youngest generation, in a
#: server process (see :func:`freeze_startup_objects`).
GC_YOUNG_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    """Keep the objects alive after start-up (modules, routes, models) out of the collector.

    A server allocates thousands of short-lived objects per request, so the cyclic collector runs
    its full collections often, and each one scanned the ~10^5 objects of the imported libraries:
    pauses of several ms that showed up as the acquire latency's tail. Measured at 64 clients
    (SQLite): p99 88-105 ms before, 33-40 ms after. Done once per server process (the app that
    opened its own storage), not for the apps tests build around a given storage.

    And the youngest generation is collected after :data:`GC_YOUNG_THRESHOLD` allocations instead
    of Python's 700: nearly everything a request allocates is freed by its reference count, but a
    group of 64 operations has more than 700 objects alive at once, so the collector ran every
    14 blocks or so and found little; 6.5-7.4 us of CPU per acquire + release went to it (3 % of
    the server's, see docs/benchmarks.md, "Fourth pass"). What it does find (cycles) waits a little
    longer: a few thousand objects at most.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def retry_policy(settings: Settings) -> RetryPolicy:
    """The Retry-After policy these settings describe."""
    return RetryPolicy(
        max_wait=settings.maximum_slot_wait_seconds, tag_max_wait=settings.tag_slot_wait_seconds
    )


class App(FastAPI):
    """FastAPI, with the hot routes served ahead of its middleware stack.

    The ASGI app, from the outside in: basic auth (when set), the body cap, then
    :class:`~slotkeeper.api.hotpath.HotPaths`, which serves acquire/release/renew/health itself and
    hands every other request to FastAPI's own stack (with ``hot_path`` off, every request goes
    there).

    FastAPI's middleware (``add_middleware``) and app or router dependencies would not apply to
    the hot routes: with the hot path on, adding them raises instead of being silently skipped.
    Wrap the stack in :meth:`build_middleware_stack`, as auth and the body cap are.
    """

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.settings = settings
        #: (full path, route) of every FastRoute, filled in by :func:`create_app`.
        self.hot_routes: list[tuple[str, FastRoute]] = []
        #: Each route's full path pattern, methods, and whether its path has parameters, as
        #: included: what a 405's ``Allow`` lists (see ``errors._allowed``).
        self.route_methods: list[tuple[re.Pattern[str], set[str], bool]] = []

    def _hot_path(self) -> bool:
        settings: Settings = self.state.settings
        return settings.hot_path

    def add_middleware(self, middleware_class: Any, *args: Any, **kwargs: Any) -> None:
        if self._hot_path():
            raise RuntimeError(
                f"add_middleware({getattr(middleware_class, '__name__', middleware_class)}) would not "
                "wrap the hot routes (api/hotpath.py serves them ahead of FastAPI's middleware): "
                "wrap the ASGI app in App.build_middleware_stack instead, or set "
                "SLOTKEEPER_HOT_PATH=false"
            )
        super().add_middleware(middleware_class, *args, **kwargs)

    def include_router(self, router: APIRouter, *args: Any, **kwargs: Any) -> None:
        hot = [route.path for route in router.routes if isinstance(route, FastRoute)]
        if hot and (kwargs.get("dependencies") or self.router.dependencies):
            raise TypeError(
                f"dependencies would not apply to the hot routes {hot} (FastRoute solves none): "
                "check the request in the endpoint, or serve it with an ordinary route"
            )
        super().include_router(router, *args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for route in router.routes:
            if isinstance(route, APIRoute | Route) and route.methods:
                pattern, _, params = compile_path(prefix + route.path)
                self.route_methods.append((pattern, set(route.methods), bool(params)))

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, with the errors the server really answers (api/openapi.py)."""
        if self.openapi_schema is None:
            self.openapi_schema = openapi.document_errors(super().openapi())
        return self.openapi_schema

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        stack = super().build_middleware_stack()
        if settings.hot_path and self.user_middleware:
            raise RuntimeError(
                "middleware given to the app would not wrap the hot routes (api/hotpath.py): "
                "wrap the ASGI app in App.build_middleware_stack instead"
            )
        app: ASGIApp = HotPaths(self.hot_routes, stack) if settings.hot_path else stack
        app = BodyLimit(app, max_bytes=settings.max_body_bytes)
        gateway: GatewayState | None = getattr(self.state, "gateway", None)
        if gateway is not None:  # outside the body cap: the upstream has its own
            app = Gateway(app, gateway)
        if settings.api_auth_string:
            opened = frozenset({metrics_route.PATH}) if settings.metrics_open else frozenset()
            app = BasicAuth(app, auth_string=settings.api_auth_string, open_paths=opened)
        if gateway is not None:  # CORS as the upstream answers it (Prefect's UI calls from its origin)
            app = GatewayFront(app, gateway, settings.cors_origins)
        metrics: Metrics | None = getattr(self.state, "metrics", None)
        return RequestLog(
            app, access_log=settings.access_log, observe=metrics.request if metrics is not None else None
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
                open_storage,
                url,
                pool_size=settings.pool_size,
                retry_policy=retry_policy(settings),
                events_pool_size=settings.events_pool_size,
                events_query_timeout=settings.events_query_timeout_seconds,
            )
        else:
            app.state.storage = storage
        store: Storage = app.state.storage
        gateway: GatewayState | None = app.state.gateway
        if gateway is not None:
            await gateway.open()
        # Gateway mode: events also go to the upstream, from the outbox (docs/gateway.md).
        delivery = start_delivery(store, settings) if gateway is not None else None
        if owned:
            freeze_startup_objects()
        broker = Broker(settings.events_subscriber_queue_size, settings.events_subscriber_queue_bytes)
        app.state.broker = broker
        app.state.events = store.event_store()
        loop = asyncio.get_running_loop()

        metrics: Metrics | None = app.state.metrics
        fan_out = broker.publish
        if metrics is not None:
            observe = metrics.published

            def fan_out(events: list[EventRecord] | None) -> None:
                if events:
                    observe(events)
                broker.publish(events)

        def publish(events: list[EventRecord] | None) -> None:  # called from a storage thread
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                loop.call_soon_threadsafe(fan_out, events)

        unsubscribe = store.subscribe_events(publish)
        unobserve = [store.observe(log_expired)]
        if metrics is not None:
            unobserve.append(metrics.attach(store, broker))
            if delivery is not None:
                unobserve.append(metrics.attach_outbox(delivery.deliverer, delivery.copies))
        # Every background loop runs under the storage's supervisor: restarted if it dies,
        # its failures logged and counted, and /api/ready fails while one keeps failing.
        supervisor = store.supervisor
        supervisor.max_failures = settings.background_max_failures
        supervisor.window = settings.background_failure_window_seconds
        jobs = [
            asyncio.create_task(
                supervisor.keep(
                    REAPER,
                    lambda: run_reaper(store, settings.reaper_interval_seconds, settings.reaper_batch_size),
                ),
                name="slotkeeper-reaper",
            ),
            asyncio.create_task(
                supervisor.keep(
                    RETENTION,
                    lambda: run_retention(
                        app.state.events,
                        settings.events_retention_seconds,
                        settings.events_retention_interval_seconds,
                    ),
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
            for undo in unobserve:
                undo()
            if delivery is not None:
                await delivery.stop()
            if gateway is not None:
                await gateway.close()
            if owned:
                await app.state.storage.close()

    app = App(
        settings,
        title="slotkeeper",
        version=__version__,
        description="Named concurrency limits with durable leases; speaks Prefect's API.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.metrics = Metrics(settings.metrics_max_limits) if settings.metrics_enabled else None
    app.state.gateway = GatewayState(settings) if settings.upstream_url else None
    routers = [
        admin.router,
        admin.hot_router(settings),
        stats.router(settings),
        *limits.routers(settings),
        *tags.routers(settings),
        *views.routers(settings),
        *live.routers(settings),
        events.router,
        websockets.router,
        sessions.router,
    ]
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    app.hot_routes = [
        (API_PREFIX + route.path, route)
        for router in routers
        for route in router.routes
        if isinstance(route, FastRoute)
    ]
    if settings.metrics_enabled:
        app.include_router(metrics_route.router)
    dashboard.install(app)
    errors.install(app)
    return app
