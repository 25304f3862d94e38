"""The SDK's session: every lease request of this process to one server over one websocket.

Why: over HTTP each acquisition and each release is a request of its own (a write and a read on
one of many connections, a request parsed by the server). A session carries the requests of
every block of the process over one connection, pipelined: the requests made in one turn of the
SDK's loop leave in one message, and the server answers those ready together in one message, so
under load a message carries dozens of them. The protocol (:mod:`slotkeeper.session`) and its
measurements are described in ``docs/sdk.md`` and ``docs/api.md``.

:meth:`Session.request` has the contract of :meth:`slotkeeper.sdk._wire.Pool.request` (the HTTP
answer of a lease route, whatever its status; :class:`ServerUnreachable` for every transport
failure; a request that was sent is never dropped half way when its caller is cancelled: a quick
one is finished, a waiting one is withdrawn with ``CANCEL`` and its answer still read), so the
acquisition loop of :mod:`._core` runs over either transport unchanged. It raises
:class:`SessionUnavailable` when the server does not offer sessions (an older server, a proxy
that only passes HTTP): the endpoint then uses HTTP, and tries a session again later.

What a lost session costs (the server restarts, the network fails): the requests in flight fail
as :class:`ServerUnreachable` and are retried by their callers as over HTTP; the server withdraws
what waited and releases any lease granted in a message this side had not acknowledged. So that
a lease released that way is never held unknowingly, ``on_lost`` is called: the SDK renews every
lease it holds on that server at once, on a new session, and a lease the server no longer has is
reported lost (410) exactly like a failed renewal over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

import orjson

from slotkeeper import session as protocol
from slotkeeper.errors import ServerUnreachable
from slotkeeper.sdk._wire import Answer, Origin

if TYPE_CHECKING:
    from websockets.client import ClientProtocol
    from websockets.frames import Frame

log = logging.getLogger("slotkeeper.sdk")

#: Bound on opening a session (TCP, TLS, the websocket handshake).
CONNECT_SECONDS = 10.0
#: How long a cancelled waiting request waits for its answer after ``CANCEL`` (it comes at once).
WITHDRAW_SECONDS = 10.0
#: After a server refused a session, how long its requests go over HTTP before the next try.
FALLBACK_SECONDS = 60.0
#: A grant is acknowledged with the next message, or alone after this long ...
ACK_SECONDS = 0.01
#: ... or this long on a caller's loop (``Session.ack_at_once``): the next turn, before the
#: task the grant wakes runs its body.
ACK_AT_ONCE_SECONDS = 0.0
#: Requests past their deadline are failed by a sweep this often (one timer per link, not one
#: per request: a timer costs more than the rest of a request's bookkeeping).
SWEEP_SECONDS = 0.5
#: A ping is sent this often; a link that received nothing since the last ping is dead.
PING_SECONDS = 10.0
#: A link with no request for this long is closed (the next request opens another).
IDLE_SECONDS = 60.0
#: Request bodies larger than this go over HTTP (a server may bound its websocket messages far
#: below its HTTP bodies), and messages are cut at this many bytes.
MAX_BODY = 64 * 1024
MAX_SEND = 512 * 1024
#: Largest message accepted from the server.
MAX_MESSAGE = 16 * 1024 * 1024

_RELEASE = "/v2/concurrency_limits/decrement-with-lease"


class SessionUnavailable(Exception):
    """The server (or a proxy in front of it) does not offer sessions: send over HTTP."""


class _Lost(Exception):
    """The link ended before the answer came."""


class _Pending:
    """A request sent and not answered yet: the future its caller awaits, its answer, and when
    its caller stops waiting (the link's sweep fails it with TimeoutError then)."""

    __slots__ = ("acquire", "answer", "deadline", "future")

    def __init__(self, future: asyncio.Future[Answer], acquire: bool, deadline: float) -> None:
        self.future = future
        self.acquire = acquire
        self.deadline = deadline
        self.answer: Answer | None = None


def _lease_id(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["lease_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""  # not a grant after all: nothing to track


def _answer(payload: bytes) -> Answer:
    status, retry_after, body = protocol.parse_answer(payload)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return status, reason, headers, body


class Link(asyncio.Protocol):
    """One websocket connection of a session: requests out, answers in."""

    def __init__(self, session: Session) -> None:
        from websockets.client import ClientProtocol
        from websockets.frames import Opcode
        from websockets.typing import Subprotocol
        from websockets.uri import parse_uri

        self.session = session
        origin = session.origin
        scheme = "wss" if origin.tls else "ws"
        host = f"[{origin.host}]" if ":" in origin.host else origin.host
        path = origin.prefix.decode("latin-1") + protocol.PATH
        self.ws: ClientProtocol = ClientProtocol(
            parse_uri(f"{scheme}://{host}:{origin.port}{path}"),
            subprotocols=[Subprotocol(protocol.SUBPROTOCOL)],
            max_size=MAX_MESSAGE,
        )
        self.binary = Opcode.BINARY
        self.loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.closed = False
        self.pending: dict[int, _Pending] = {}
        #: Requests whose caller stopped waiting: a grant answered to one of them is released.
        self.forgotten: dict[int, bool] = {}
        self.next_id = 1
        self.outbox: list[bytes] = []
        self.flushing = False
        self.received = 0  # messages read from the server
        self.acked = 0  # ... and acknowledged
        self.ack_timer: asyncio.TimerHandle | None = None
        #: Leases granted in messages whose acknowledgement the server has not confirmed yet
        #: (by message number): if the link is lost, the server may release them.
        self.unconfirmed: deque[tuple[int, list[str]]] = deque()
        self.heard = True  # something came since the last ping
        self.ping_timer: asyncio.TimerHandle | None = None
        self.last_request = self.loop.time()
        self.sweeper: asyncio.TimerHandle | None = None
        self.sweep_at = 0.0

    # --- the connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        handshake = self.ws.connect()
        if self.session.authorization:
            handshake.headers["Authorization"] = self.session.authorization
        self.ws.send_request(handshake)
        self._write_out()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if not self.opened.done():
                self._handshake_done()
                continue
            if getattr(event, "opcode", None) is self.binary:
                try:
                    self._message(bytes(cast("Frame", event).data))
                except protocol.ProtocolError as exc:
                    log.error("The session to %s broke its protocol: %s", self.session.origin.base_url, exc)
                    ws.fail(protocol.PROTOCOL_ERROR, str(exc)[:120])
                    break
        self._write_out()
        if ws.close_expected() and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self.ack_timer, self.ping_timer, self.sweeper):
            if timer is not None:
                timer.cancel()
        received = self.ws.close_rcvd
        code = received.code if received is not None else None
        why = f"close code {code}" if code is not None else (str(exc) if exc else "connection closed")
        if not self.opened.done():
            self.opened.set_exception(_Lost(why))
        for entry in self.pending.values():
            if not entry.future.done():
                entry.future.set_exception(_Lost(why))
        # A server shutting down keeps every grant it sent; otherwise it releases those whose
        # acknowledgement it had not confirmed.
        at_risk = set() if code == protocol.SERVICE_RESTART else self.at_risk()
        self.session.lost(self, self.open, at_risk)

    def _handshake_done(self) -> None:
        ws = self.ws
        if ws.handshake_exc is not None or ws.subprotocol != protocol.SUBPROTOCOL:
            status = getattr(getattr(ws.handshake_exc, "response", None), "status_code", None)
            why = f"HTTP {status}" if status else str(ws.handshake_exc or "no session subprotocol")
            if not self.opened.done():
                self.opened.set_exception(SessionUnavailable(why))
            if self.transport is not None:
                self.transport.close()
            return
        self.open = True
        self.ping_timer = self.loop.call_later(PING_SECONDS, self._ping)
        if not self.opened.done():
            self.opened.set_result(None)

    def _write_out(self) -> None:
        data = self.ws.data_to_send()
        if self.transport is None or self.transport.is_closing():
            return
        for chunk in data:
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def _ping(self) -> None:
        if self.closed:
            return
        if not self.pending and self.loop.time() - self.last_request > IDLE_SECONDS:
            self.session.idle(self)
            return
        if not self.heard:
            log.warning("The session to %s stopped answering; reconnecting", self.session.origin.base_url)
            assert self.transport is not None
            self.transport.abort()
            return
        self.heard = False
        self.ws.send_ping(b"")
        self._write_out()
        self.ping_timer = self.loop.call_later(PING_SECONDS, self._ping)

    def close(self, *, now: bool = False) -> None:
        """Acknowledge what was read and close the websocket (the session ends cleanly); the
        connection is closed a second later, or at once if ``now`` (its loop is closing)."""
        if self.closed or not self.open:
            if self.transport is not None:
                self.transport.close()
            return
        self._flush()
        self.ws.send_close(protocol.NORMAL)
        self._write_out()
        self.open = False
        if self.transport is not None:
            if now:
                self.transport.close()
            else:
                self.loop.call_later(1.0, self.transport.close)

    # --- messages ---------------------------------------------------------------------------------

    def _message(self, data: bytes) -> None:
        self.received += 1
        # The leases granted in this message, at risk until the server confirms it knows this
        # message was read; tracked as each answer is read (a broken record later in the message
        # must not leave one untracked).
        granted: list[str] = []
        self.unconfirmed.append((self.received, granted))
        try:
            for kind, ident, payload in protocol.records(data):
                if kind == protocol.ACKED:
                    self._confirmed(ident)
                elif kind == protocol.ANSWER:
                    self._answered(ident, _answer(payload), granted)
                else:
                    raise protocol.ProtocolError(f"unexpected record kind {kind} from the server")
        finally:
            if not granted and self.unconfirmed and self.unconfirmed[-1][1] is granted:
                self.unconfirmed.pop()
        if granted and self.ack_timer is None:
            # On a caller's loop, before the task the grant wakes can run its body (the next
            # turn): a body that blocks its loop must not hold a grant the server does not know
            # arrived, which it would release if the session were dropped meanwhile.
            delay = ACK_AT_ONCE_SECONDS if self.session.ack_at_once else ACK_SECONDS
            self.ack_timer = self.loop.call_later(delay, self._flush)

    def _confirmed(self, count: int) -> None:
        unconfirmed = self.unconfirmed
        while unconfirmed and unconfirmed[0][0] <= count:
            unconfirmed.popleft()

    def _answered(self, ident: int, answer: Answer, granted: list[str]) -> None:
        entry = self.pending.get(ident)
        if entry is not None:
            if entry.acquire and answer[0] == 200:
                granted.append(_lease_id(answer[3]))
            entry.answer = answer
            if not entry.future.done():
                entry.future.set_result(answer)
            return
        # Answered after its caller stopped waiting: nobody holds a grant in it.
        if self.forgotten.pop(ident, False) and answer[0] == 200:
            lease_id = _lease_id(answer[3])
            granted.append(lease_id)
            log.debug("Releasing lease %s, granted to a request nobody waits for any more", lease_id)
            self._release(lease_id)

    def _release(self, lease_id: str) -> None:
        ident = self._send(_RELEASE, orjson.dumps({"lease_id": lease_id}))
        self.forgotten[ident] = False

    def at_risk(self) -> set[str]:
        """The leases the server releases if this link is lost now (see the module's doc)."""
        return {lease_id for _, ids in self.unconfirmed for lease_id in ids}

    def _send(self, path: str, body: bytes) -> int:
        self.last_request = self.loop.time()
        ident = self.next_id
        self.next_id += 1
        self._queue(protocol.record(protocol.REQUEST, ident, protocol.request_payload("POST", path, body)))
        return ident

    def _queue(self, data: bytes) -> None:
        self.outbox.append(data)
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send everything queued (and the acknowledgement), in as few messages as it takes."""
        self.flushing = False
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.closed or not self.open:
            return
        parts = self.outbox
        if self.received > self.acked:
            parts.insert(0, protocol.record(protocol.ACK, self.received))
            self.acked = self.received
        if not parts:
            return
        self.outbox = []
        message: list[bytes] = []
        size = 0
        for part in parts:
            if message and (len(message) == protocol.MAX_RECORDS or size + len(part) > MAX_SEND):
                self.ws.send_binary(b"".join(message))
                message, size = [], 0
            message.append(part)
            size += len(part)
        self.ws.send_binary(b"".join(message))
        self._write_out()

    # --- requests ---------------------------------------------------------------------------------

    async def exchange(self, method: str, path: str, body: bytes, timeout: float, withdraw: bool) -> Answer:
        """One request and its answer (see :meth:`Session.request`)."""
        if self.closed or not self.open:
            raise _Lost("the session is closed")
        entry = _Pending(self.loop.create_future(), (method, path) == protocol.ACQUIRE, 0.0)
        ident = self._send(path, body)
        self.pending[ident] = entry
        delivered = False
        try:
            try:
                answer = await self._within(entry, self.loop.time() + timeout)
            except asyncio.CancelledError:
                # The answer may have come in the very loop step of the cancellation: keep it
                # (it may be a grant). Otherwise finish the request, withdrawing it if it waits.
                if entry.answer is None:
                    entry.future = self.loop.create_future()  # the cancelled one is spent
                    if withdraw:
                        self._queue(protocol.record(protocol.CANCEL, ident))
                        deadline = self.loop.time() + WITHDRAW_SECONDS
                    else:
                        deadline = self.loop.time() + timeout
                    try:
                        await self._within(entry, deadline)
                    except (_Lost, TimeoutError):
                        raise asyncio.CancelledError from None
                assert entry.answer is not None
                answer = entry.answer
            delivered = True
            return answer
        finally:
            self.pending.pop(ident, None)
            if not delivered:
                if entry.answer is None:
                    self.forgotten[ident] = entry.acquire  # a grant that comes later is released
                elif entry.acquire and entry.answer[0] == 200:
                    self._release(_lease_id(entry.answer[3]))  # nobody will take it

    async def _within(self, entry: _Pending, deadline: float) -> Answer:
        entry.deadline = deadline
        if self.sweeper is None or deadline < self.sweep_at:
            self._sweep_at(min(deadline, self.loop.time() + SWEEP_SECONDS))
        return await entry.future

    def _sweep_at(self, when: float) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.sweep_at = when
        self.sweeper = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        """Fail the requests whose caller's deadline has passed; again soon while any waits."""
        self.sweeper = None
        now = self.loop.time()
        for entry in self.pending.values():
            if entry.deadline <= now and not entry.future.done():
                entry.future.set_exception(TimeoutError())
        if self.pending and not self.closed:
            soonest = min(entry.deadline for entry in self.pending.values())
            self._sweep_at(max(min(soonest, now + SWEEP_SECONDS), now))


class Session:
    """The session of one endpoint: its current link, opened on demand and again after a loss."""

    def __init__(
        self,
        origin: Origin,
        authorization: str | None,
        on_lost: Callable[[set[str]], None],
        *,
        ack_at_once: bool = False,
    ) -> None:
        self.origin = origin
        self.authorization = authorization
        self.on_lost = on_lost
        #: Acknowledge a grant in the next turn of the loop, not within :data:`ACK_SECONDS`
        #: (a session on a caller's loop, see :meth:`Link._message`).
        self.ack_at_once = ack_at_once
        self.link: Link | None = None
        self._opening: asyncio.Future[Link] | None = None
        self._unavailable_until = 0.0

    def carries(self, method: str, path: str, body: bytes) -> bool:
        """Whether this request goes over the session: a lease route with a body of a usual
        size, and sessions not refused lately."""
        if self._unavailable_until and asyncio.get_running_loop().time() < self._unavailable_until:
            return False
        return len(body) <= MAX_BODY and protocol.carries(method, path)

    async def request(
        self, method: str, path: str, body: bytes, timeout: float, *, withdraw: bool = False
    ) -> Answer:
        """One request over the session: its answer, whatever its status.

        Raises :class:`SessionUnavailable` (nothing was sent: use HTTP) or
        :class:`ServerUnreachable`. Cancelled after the request was sent, it still returns the
        answer if one comes (a waiting request is withdrawn first); the caller tells a
        cancellation by ``Task.cancelling()``, as with :meth:`slotkeeper.sdk._wire.Pool.request`.
        """
        link = await self._link()
        try:
            return await link.exchange(method, path, body, timeout, withdraw)
        except TimeoutError as exc:
            raise ServerUnreachable(f"No answer from {self.origin.base_url} within {timeout:g} s") from exc
        except _Lost as exc:
            raise ServerUnreachable(f"Lost the session to {self.origin.base_url}: {exc}") from exc

    async def _link(self) -> Link:
        link = self.link
        if link is not None and link.open and not link.closed:
            return link
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
        # Shared by every request that needs it: one caller's cancellation does not stop it.
        return await asyncio.shield(self._opening)

    async def _connect(self) -> Link:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            try:
                async with asyncio.timeout(CONNECT_SECONDS):
                    transport, link = await loop.create_connection(
                        lambda: Link(self),
                        origin.host,
                        origin.port,
                        ssl=origin.ssl_context(),
                        server_hostname=origin.host if origin.tls else None,
                    )
                    link.transport = transport  # uvloop may call connection_made after this returns
                    await link.opened
            except SessionUnavailable as exc:
                self._unavailable_until = loop.time() + FALLBACK_SECONDS
                log.info("%s offers no session (%s): using HTTP", origin.base_url, exc)
                raise
            except _Lost as exc:
                # Closed during the handshake: a proxy that does not pass websockets, or a server
                # going away. HTTP will tell which.
                self._unavailable_until = loop.time() + FALLBACK_SECONDS
                raise SessionUnavailable(str(exc)) from exc
            except (OSError, TimeoutError) as exc:
                raise ServerUnreachable(
                    f"Could not reach {origin.base_url}: {exc or type(exc).__name__}"
                ) from exc
            self.link = link
            return link
        finally:
            self._opening = None

    def lost(self, link: Link, was_open: bool, at_risk: set[str]) -> None:
        """A link ended (called by the link); ``at_risk``: the leases the server released."""
        if self.link is link:
            self.link = None
        if was_open:
            log.info("The session to %s ended; renewing the leases held there", self.origin.base_url)
            self.on_lost(at_risk)

    def idle(self, link: Link) -> None:
        """``link`` carried no request for a while: close it (a server need not keep a
        websocket per process that once took a slot)."""
        if self.link is link:
            self.link = None
        link.close()

    def close(self, *, now: bool = False) -> None:
        """End the session cleanly (the process exits, or the loop it runs on closes: ``now``)."""
        link, self.link = self.link, None
        if link is not None:
            link.close(now=now)
