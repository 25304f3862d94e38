"""The server process: uvicorn, with a shutdown that answers the queue first.

uvicorn's own shutdown (on SIGTERM or SIGINT) stops accepting connections, then waits for every
request in flight, and a request waiting in the queue may wait for an hour. Here the shutdown
first stops accepting and ends the live views' streams (:func:`slotkeeper.api.live.end_streams`;
browsers reconnect to whichever server answers), then answers every waiting request at once with 503 ``shutting_down``
and its waiter id (:meth:`slotkeeper.storage.Storage.detach_waiters`: its place in the queue is
kept for ``SLOTKEEPER_DETACHED_WAITER_SECONDS``, for its retry on this server restarted or on any
other process of the database), lets the sessions (``/api/slotkeeper/session``) send those
answers before their websockets are closed (with 1012, "service restart"), then gives the
other requests in flight up to
``SLOTKEEPER_SHUTDOWN_GRACE_SECONDS`` (uvicorn's ``timeout_graceful_shutdown``) before it
cancels them and closes the storage. Held leases are not touched: their holders keep renewing
them on whatever process answers.
"""

from __future__ import annotations

import logging
import socket

import uvicorn
from fastapi import FastAPI

from slotkeeper.api import live, session
from slotkeeper.api.protocol import HttpToolsProtocol
from slotkeeper.settings import Settings
from slotkeeper.storage.waiting import SHUTDOWN_RETRY_AFTER

log = logging.getLogger("slotkeeper.server")

#: How long a shutdown waits for the sessions to send the queue's 503s (they go out at once).
SESSIONS_SETTLE_SECONDS = 2.0


class Server(uvicorn.Server):
    """uvicorn's server; its shutdown detaches the queue's waiters before anything else."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.app = app
        self.settings = settings

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first (uvicorn does it again: harmless)
            server.close()
        for sock in sockets or []:
            sock.close()
        live.end_streams(self.app)  # the dashboards' streams, which uvicorn would wait for
        storage = getattr(self.app.state, "storage", None)
        if storage is not None:
            try:
                detached = await storage.detach_waiters(
                    SHUTDOWN_RETRY_AFTER, self.settings.detached_waiter_seconds
                )
            except Exception:  # the database is gone: the waiters' requests end with the process
                log.exception("could not detach the waiting requests")
            else:
                if detached:
                    log.info("answered %d waiting request(s) 503: their places are kept", detached)
        # Sessions carry those answers too: let them go out before the websockets are closed.
        await session.settle_sessions(self.app, SESSIONS_SETTLE_SECONDS)
        await super().shutdown(sockets)


def serve(app: FastAPI, settings: Settings, log_level: str) -> None:
    """Run ``app`` until SIGTERM or SIGINT (see the module's doc)."""
    from slotkeeper.logs import log_config

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with a lost connection seen at once: a grant is never answered into it.
        http=HttpToolsProtocol,
        access_log=False,  # slotkeeper's own (SLOTKEEPER_ACCESS_LOG), with request ids
        lifespan="on",
        log_level=log_level,
        log_config=log_config(log_level, settings.log_format),
        # A float works (asyncio.timeout); uvicorn's annotation says int.
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,  # type: ignore[arg-type]
    )
    Server(config, app, settings).run()
