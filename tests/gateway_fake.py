"""A fake upstream Prefect server for the gateway's own tests (aiohttp.web, in the test's loop).

It records every request it gets and answers:

- ``ANY /api/echo/...``: JSON of what it received (method, raw path, query, headers, body size
  and a digest of the body);
- ``GET /api/stream?chunks=N``: N chunks of 64 KiB, streamed;
- ``GET /api/hang``: never answers (until the connection is dropped);
- ``GET /api/cut``: starts a streamed answer, then drops the connection;
- ``GET /api/csrf-token``: 422 "CSRF protection is disabled." or a token (``csrf_enabled``);
- ``POST /api/v2/concurrency_limits/leases/{id}/renew``: 204 for an id in ``leases``, else 410;
- ``OPTIONS /api/flows/``: a CORS preflight's answer, allowing the request's origin;
- ``POST /api/events/filter``: a page with a ``next_page`` link built from the request (as
  Prefect's server: ``request.base_url``, i.e. the Host header and scheme);
- websocket ``/api/events/in`` and ``/api/ws/echo``: echoes text frames as ``echo:<text>`` and
  binary frames as they are; a text frame ``close:<code>`` makes it close with that code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

CHUNK = b"x" * 65536


@dataclass
class FakeUpstream:
    url: str = ""  # http://127.0.0.1:PORT/api
    port: int = 0
    csrf_enabled: bool = False
    #: Lease ids the fake holds (a deployment's, taken by the server itself).
    leases: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    sockets_open: int = 0
    runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/api/echo/{tail:.*}", self.echo)
        app.router.add_get("/api/stream", self.stream)
        app.router.add_get("/api/hang", self.hang)
        app.router.add_get("/api/cut", self.cut)
        app.router.add_get("/api/csrf-token", self.csrf)
        app.router.add_post("/api/events/filter", self.events_page)
        app.router.add_get("/api/events/in", self.websocket)
        app.router.add_get("/api/ws/echo", self.websocket)
        app.router.add_route("OPTIONS", "/api/flows/", self.preflight)
        app.router.add_post("/api/v2/concurrency_limits/leases/{lease}/renew", self.renew)
        return app

    def _record(self, request: web.Request, body: bytes) -> dict[str, Any]:
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
        }
        self.requests.append(seen)
        return seen

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = self._record(request, body)
        status = int(request.query.get("status", "200"))
        return web.json_response(
            seen,
            status=status,
            headers={"X-Upstream": "yes", "Connection": "keep-alive, X-Private", "X-Private": "hop"},
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._record(request, b"")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(int(request.query.get("chunks", "4"))):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    async def hang(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        self._record(request, b"")
        response = web.StreamResponse(headers={"Content-Length": str(len(CHUNK) * 4)})
        await response.prepare(request)
        await response.write(CHUNK)
        assert request.transport is not None
        request.transport.close()
        return response

    async def csrf(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        if not self.csrf_enabled:
            return web.json_response({"detail": "CSRF protection is disabled."}, status=422)
        return web.json_response(
            {
                "id": "6f0e7c5e-1c1c-4a43-a1b1-4b0f8b7f2f11",
                "created": "2026-12-07T20:00:00Z",
                "updated": "2026-12-07T20:00:00Z",
                "token": "upstream-token",
                "client": request.query.get("client", ""),
                "expiration": "2026-12-07T21:00:00Z",
            }
        )

    async def events_page(self, request: web.Request) -> web.Response:
        self._record(request, await request.read())
        proto = request.headers.get("X-Forwarded-Proto", request.scheme)
        base = f"{proto}://{request.headers['Host']}/"
        return web.json_response(
            {"events": [], "total": 0, "next_page": f"{base}api/events/filter/next?page-token=abc"}
        )

    async def renew(self, request: web.Request) -> web.Response:
        self._record(request, await request.read())
        if request.match_info["lease"] in self.leases:
            return web.Response(status=204)
        return web.json_response({"detail": "Lease not found - upstream"}, status=410)

    async def preflight(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        return web.Response(
            headers={
                "Access-Control-Allow-Origin": request.headers.get("Origin", ""),
                "Access-Control-Allow-Methods": "POST",
                "X-Upstream": "yes",
            }
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request, b"")
        ws = web.WebSocketResponse(protocols=("prefect",), autoclose=False)
        await ws.prepare(request)
        self.sockets_open += 1
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    if message.data.startswith("close:"):
                        await ws.close(code=int(message.data.removeprefix("close:")), message=b"asked to")
                        break
                    await ws.send_str("echo:" + message.data)
                elif message.type is WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
                elif message.type is WSMsgType.CLOSE:
                    await ws.close()
        finally:
            self.sockets_open -= 1
        return ws

    async def start(self, port: int = 0) -> None:
        # handler_cancellation: a handler whose client left (a gateway that timed out) ends.
        self.runner = web.AppRunner(
            self.app(), handle_signals=False, shutdown_timeout=1, handler_cancellation=True
        )
        await self.runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self.runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{self.port}/api"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def fake_upstream(**kwargs: Any) -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(**kwargs)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()
