"""``/api/slotkeeper/session``: the lease requests of one client process over one websocket.

The protocol is defined in :mod:`slotkeeper.session`; why it exists and what it costs is in
``docs/api.md`` ("Sessions") and ``ARCHITECTURE.md``. This module only carries requests: each
``REQUEST`` record is served by the very handler that serves the same route over HTTP (the
``FastRoute`` handlers of :mod:`slotkeeper.api.limits`, errors rendered by
:func:`slotkeeper.api.errors.render`), so validation, storage calls and answers are the HTTP
ones. What the session adds:

* **Many requests in flight, answers batched.** Every request runs in its own task; the answers
  that are ready in one turn of the event loop leave in one websocket message. With SQLite the
  requests of one message also commit together (the backend's group commit).
* **Withdrawal.** ``CANCEL`` does for one request what closing its connection does over HTTP: a
  request waiting for slots sees its client "disconnect", withdraws from the queue, and releases
  a grant that raced the withdrawal (``limits._wait``); it is answered 499.
* **Nothing leaks when the session ends.** The client acknowledges the messages it has read
  (``ACK``; the server confirms with ``ACKED``). When the websocket closes, every request still
  running is withdrawn and every grant answered too late to be sent is released; unless the
  server itself is shutting down (close code 1012), so is every lease granted in a message the
  client had not acknowledged: nobody may hold it. Leases the client acknowledged stay, as
  leases do over HTTP: their holder renews them on a new session or they expire.

Bounds: the message size is the server's ``ws_max_size`` (uvicorn: 16 MiB), each request body
``max_body_bytes`` (413, as over HTTP), a message at most ``protocol.MAX_RECORDS`` records; a
session has at most :data:`MAX_IN_FLIGHT` requests running (the next ones are answered 429), and
stops reading a client that leaves :data:`MAX_UNSENT` answers unread, and closes one that leaves
:data:`MAX_UNACKED` messages with grants unacknowledged. Auth is checked on the
upgrade request, before the websocket is accepted: no unauthenticated websocket is ever open, so
no auth deadline is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response, WebSocket
from starlette.types import Message, Receive, Scope, Send

from slotkeeper import session as protocol
from slotkeeper.api import errors
from slotkeeper.api.fastroute import FastRoute
from slotkeeper.api.hotpath import CARRIED, ROUTE_TEMPLATE, HotPaths
from slotkeeper.api.middleware import authorized, basic_credentials, cross_origin
from slotkeeper.api.responses import json_response
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage

log = logging.getLogger("slotkeeper.api.session")

router = APIRouter(tags=["Sessions"])

#: Requests one session may have running at once; more are answered 429 until some finish.
MAX_IN_FLIGHT = 4096
#: Answers waiting to be sent (the client does not read them) past which the session stops
#: reading the client's messages until they are sent: TCP's flow control then holds the client.
MAX_UNSENT = 4096
#: Messages with grants a client may leave unacknowledged (it acknowledges within milliseconds).
MAX_UNACKED = 4096
#: An ``ACK`` is confirmed (``ACKED``) with the next message, or alone after this long.
CONFIRM_SECONDS = 0.01
#: The answer to a request that is not one of the session's routes (sent over HTTP instead).
NOT_ON_SESSION = "This request is not served on a session; send it over HTTP."
_DISCONNECT: Message = {"type": "http.disconnect"}
#: The keys of the websocket's scope that its requests' scopes keep.
_SCOPE_KEYS = ("asgi", "http_version", "scheme", "server", "client", "root_path", "headers", "app", "state")


class _Carried:
    """One request carried by the session, and its "connection" as the handler sees it, which is
    lost when the client cancels the request or the session ends."""

    __slots__ = ("cancelled", "grants", "ident", "waiter")

    def __init__(self, ident: int, grants: bool) -> None:
        self.ident = ident
        self.grants = grants  # an acquisition: its 200 answer holds a lease
        self.cancelled = False
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        """The ASGI ``receive`` of the request once its body is read: the disconnect, when it
        comes (the body is :meth:`_Request.body`'s)."""
        if not self.cancelled:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return _DISCONNECT

    def cancel(self) -> None:
        self.cancelled = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _Request(Request):
    """The handler's request: the body comes with it (no ASGI body messages to read)."""

    def __init__(self, scope: Scope, carried: _Carried, body: bytes) -> None:
        super().__init__(scope, carried.receive)
        self._carried_body = body

    async def body(self) -> bytes:
        return self._carried_body


async def _nowhere(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise RuntimeError("the session's route table has no fallback")


def _routes(app: Any, prefix: str) -> HotPaths:
    """The session's routes of ``app`` (whose API is under ``prefix``): its hot routes that
    :data:`protocol.ROUTES` names."""
    table: HotPaths | None = getattr(app.state, "session_routes", None)
    if table is None:
        chosen = [
            (path, route)
            for path, route in app.hot_routes
            for method in route.methods or ()
            if (method, path.removeprefix(prefix)) in protocol.ROUTES
        ]
        table = app.state.session_routes = HotPaths(chosen, _nowhere)
    return table


class Session:
    """The server side of one session (one websocket)."""

    def __init__(self, websocket: WebSocket, routes: HotPaths, prefix: str) -> None:
        self.websocket = websocket
        self.routes = routes
        self.prefix = prefix
        self.storage: Storage = websocket.app.state.storage
        self.max_body = websocket.app.state.settings.max_body_bytes
        # What a handler may read of its request's scope (the app, the client, the headers).
        ws = websocket.scope
        self.scope = {key: ws[key] for key in _SCOPE_KEYS if key in ws}
        self.scope.update({"type": "http", "query_string": b"", CARRIED: True})
        # A record's body is JSON by the protocol: its handler reads it so, whatever the
        # upgrade request's own Content-Type (see fastroute.declares_json).
        self.scope["headers"] = [
            *((k, v) for k, v in ws["headers"] if k != b"content-type"),
            (b"content-type", b"application/json"),
        ]
        self.running: dict[int, tuple[_Carried, asyncio.Task[None]]] = {}
        self.out: list[bytes] = []
        #: Lease grants of the current message (answer bodies), and of each message sent but not
        #: acknowledged yet (by message number).
        self.grants: list[bytes] = []
        self.unacked: deque[tuple[int, list[bytes]]] = deque()
        self.sent = 0
        #: The client's last ``ACK``, and the last one confirmed to it with ``ACKED``.
        self.acked = 0
        self.confirmed = 0
        self.confirming: asyncio.TimerHandle | None = None
        self.ended = False
        #: Grants answered after the session ended: nobody will read them.
        self.orphans: list[bytes] = []
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.sending = False
        self.written = asyncio.Event()
        self.writer = asyncio.create_task(self._write(), name="slotkeeper-session-writer")

    # --- from the client ----------------------------------------------------------------------

    def received(self, message: bytes) -> None:
        for kind, ident, payload in protocol.records(message):
            if kind == protocol.REQUEST:
                self._start(ident, payload)
            elif kind == protocol.CANCEL:
                found = self.running.get(ident)
                if found is not None:
                    found[0].cancel()
            elif kind == protocol.ACK:
                self._acknowledged(ident)
            else:
                raise protocol.ProtocolError(f"unknown record kind {kind}")
        if len(self.unacked) > MAX_UNACKED:
            raise protocol.ProtocolError(f"more than {MAX_UNACKED} messages with grants left unacknowledged")

    async def room(self) -> None:
        """Return once fewer than :data:`MAX_UNSENT` answers wait to be sent."""
        while len(self.out) >= MAX_UNSENT:
            self.space.clear()
            await self.space.wait()

    def _acknowledged(self, count: int) -> None:
        if count > self.sent:
            raise protocol.ProtocolError(f"ACK {count}: only {self.sent} messages were sent")
        if count <= self.acked:
            return
        self.acked = count
        unacked = self.unacked
        while unacked and unacked[0][0] <= count:
            unacked.popleft()
        # Confirmed with the next message, or alone soon: under load an answer carries it.
        if self.confirming is None:
            self.confirming = asyncio.get_running_loop().call_later(CONFIRM_SECONDS, self.ready.set)

    def _start(self, ident: int, payload: bytes) -> None:
        if ident in self.running:
            raise protocol.ProtocolError(f"request {ident} is already running")
        method, path, body = protocol.parse_request(payload)
        if len(body) > self.max_body:
            detail = f"Request body is larger than {self.max_body} bytes."
            self._answer(ident, json_response({"detail": detail, "code": "body_too_large"}, 413))
            return
        full = self.prefix + path
        matched = self.routes.match(method, full)
        if matched is None:
            self._answer(ident, json_response({"detail": NOT_ON_SESSION, "code": "not_on_session"}, 404))
            return
        if len(self.running) >= MAX_IN_FLIGHT:
            detail = f"More than {MAX_IN_FLIGHT} requests are running on this session; retry."
            busy = {"detail": detail, "code": "session_busy"}
            self._answer(ident, json_response(busy, 429, {"Retry-After": "1"}))
            return
        (route, template), params = matched
        carried = _Carried(ident, (method, path) == protocol.ACQUIRE)
        scope = {
            **self.scope,
            "method": method,
            "path": full,
            "path_params": params,
            ROUTE_TEMPLATE: template,
        }
        task = asyncio.create_task(self._serve(carried, route, _Request(scope, carried, body)))
        self.running[ident] = (carried, task)

    async def _serve(self, carried: _Carried, route: FastRoute, request: Request) -> None:
        try:
            try:
                response = await route.handler(request)
            except Exception as exc:  # rendered as over HTTP (a bug is a logged 500)
                response = await errors.render(request, exc)
        finally:
            del self.running[carried.ident]
        if self.ended:
            if carried.grants and response.status_code == 200:
                self.orphans.append(_body(response))
            return
        self._answer(carried.ident, response, carried.grants)

    # --- to the client -----------------------------------------------------------------------

    def _answer(self, ident: int, response: Response, grants: bool = False) -> None:
        body = _body(response)
        retry_after = next(
            (v.decode("latin-1") for k, v in response.raw_headers if k == b"retry-after"), None
        )
        payload = protocol.answer_payload(response.status_code, retry_after, body)
        self.out.append(protocol.record(protocol.ANSWER, ident, payload))
        if grants and response.status_code == 200:
            self.grants.append(body)
        self.ready.set()

    async def _write(self) -> None:
        """Send what is ready, one message per turn of the loop (answers batch up meanwhile)."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.acked > self.confirmed:
                self.out.insert(0, protocol.record(protocol.ACKED, self.acked))
                self.confirmed = self.acked
                if self.confirming is not None:
                    self.confirming.cancel()
                    self.confirming = None
            if not self.out:
                continue
            message = b"".join(self.out)
            self.out.clear()
            self.space.set()
            self.sent += 1
            if self.grants:
                self.unacked.append((self.sent, self.grants))
                self.grants = []
            self.sending = True
            try:
                await self.websocket.send({"type": "websocket.send", "bytes": message})
            except Exception:  # the client is gone: its grants are released by ``end``
                return
            finally:
                self.sending = False
                self.written.set()

    async def settle(self) -> None:
        """Return once the requests running now are answered and their answers sent (or the
        session is gone). At a shutdown the requests waiting in the queue are answered 503 with
        their place (``Storage.detach_waiters``): their clients must read it before the server
        closes the websocket."""
        running = [task for _, task in self.running.values()]
        if running:
            await asyncio.wait(running)
        while (self.out or self.sending) and not self.writer.done():
            self.written.clear()
            await self.written.wait()

    # --- the end ---------------------------------------------------------------------------------

    async def end(self, code: int) -> None:
        """Withdraw what still runs; release every grant the client never saw, and unless the
        server is shutting down (``code`` :data:`protocol.SERVICE_RESTART`), every grant it has
        not acknowledged: the client then treats those as lost, and nobody holds them.

        On a shutdown the grants sent stay held, as they would over HTTP: they were written
        before the close, so the client has them and renews them on the next server.
        """
        self.ended = True
        if self.confirming is not None:
            self.confirming.cancel()
        self.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.writer
        for carried, _ in self.running.values():
            carried.cancel()
        running = [task for _, task in self.running.values()]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        lost = [*self.grants, *self.orphans]
        if code != protocol.SERVICE_RESTART:
            lost += [body for _, bodies in self.unacked for body in bodies]
        released = sum(await asyncio.gather(*(self._release(body) for body in lost)))
        if released:
            log.info("session ended: released %d lease(s) its client may never have seen", released)

    async def _release(self, grant: bytes) -> bool:
        lease_id = orjson.loads(grant)["lease_id"]  # our own answer
        try:
            return await self.storage.release_lease(str(lease_id))
        except Exception as exc:  # the storage is closing: the lease expires instead
            log.warning("could not release lease %s of an ended session: %s", lease_id, exc)
            return False


def _live(app: Any) -> set[Session]:
    """The sessions ``app`` serves now."""
    live: set[Session] | None = getattr(app.state, "sessions", None)
    if live is None:
        live = app.state.sessions = set()
    return live


async def settle_sessions(app: Any, timeout: float) -> None:
    """At a shutdown, once the queue's requests are answered: let every session send its answers
    before the server closes the websockets (with 1012), for at most ``timeout`` seconds."""
    live = list(getattr(app.state, "sessions", ()))
    if not live:
        return
    settling = [asyncio.ensure_future(state.settle()) for state in live]
    _, late = await asyncio.wait(settling, timeout=timeout)
    for task in late:
        task.cancel()
    if late:
        log.warning("%d session(s) had not sent every answer after %g s; closing them", len(late), timeout)


def _body(response: Response) -> bytes:
    body = response.body
    return body if isinstance(body, bytes) else bytes(body)


def _authorized(websocket: WebSocket, settings: Settings) -> bool:
    secret = settings.api_auth_string
    if not secret:
        return True
    given = websocket.headers.get("authorization", "").encode("latin-1", "replace")
    return authorized(given, basic_credentials(secret))


async def _deny(websocket: WebSocket, response: Response, code: int) -> None:
    """Refuse the upgrade with an HTTP answer (or, if the server cannot send one, a close)."""
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # pragma: no cover - the ASGI server lacks the denial-response extension
        await websocket.close(code)


@router.websocket(protocol.PATH, name="session")
async def session(websocket: WebSocket) -> None:
    """Serve one session until the client closes it or it is lost (see the module's doc)."""
    settings: Settings = websocket.app.state.settings
    if cross_origin(websocket.headers.get("origin"), websocket.headers.get("host")):
        refused = {"detail": "Sessions are not opened from web pages of other sites.", "code": "cross_origin"}
        await _deny(websocket, json_response(refused, 403), 1008)
        return
    if not _authorized(websocket, settings):
        unauthorized = {"exception_message": "Unauthorized", "code": "unauthorized"}
        await _deny(websocket, json_response(unauthorized, 401), 1008)
        return
    offered = [
        part.strip()
        for header in websocket.headers.getlist("sec-websocket-protocol")
        for part in header.split(",")
    ]
    if protocol.SUBPROTOCOL not in offered:
        detail = f"Offer the websocket subprotocol {protocol.SUBPROTOCOL!r}."
        await _deny(websocket, json_response({"detail": detail, "code": "unsupported_protocol"}, 400), 1002)
        return
    await websocket.accept(subprotocol=protocol.SUBPROTOCOL)
    prefix = websocket.scope["path"].removesuffix(protocol.PATH)  # where the API is mounted
    state = Session(websocket, _routes(websocket.app, prefix), prefix)
    live = _live(websocket.app)
    live.add(state)
    close: tuple[int, str] | None = None
    code = protocol.NORMAL
    try:
        while True:
            await state.room()
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code", protocol.NORMAL))
                break
            data = message.get("bytes")
            if data is None:
                close = (protocol.UNSUPPORTED_DATA, "Session messages are binary")
                break
            try:
                state.received(data)
            except protocol.ProtocolError as exc:
                close = (protocol.PROTOCOL_ERROR, str(exc)[:120])
                break
    finally:
        live.discard(state)
        await state.end(code)
    if close is not None:
        with contextlib.suppress(RuntimeError):
            await websocket.close(*close)
