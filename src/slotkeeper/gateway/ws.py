"""The websocket relay: a forwarded websocket, client <-> upstream, frame by frame.

Every websocket route under ``/api`` that the gateway does not answer itself is relayed
(``/api/events/in``, ``/api/events/out``, ``/api/logs/out``, task-run subscriptions, any other
Prefect has or adds). The relay connects to the upstream first, with the client's subprotocols
and end-to-end headers (auth included), then accepts the client with the subprotocol the upstream
chose, and copies frames both ways until either side closes; the other side is then closed with
the same code and reason.

Text frames from the client may be rewritten or dropped on their way by the route's
:class:`FrameFilter` (:data:`FRAME_FILTERS`, keyed by path; by default every frame passes
unchanged). The filter is awaited in line, so frames keep their order; it must not block.

The client's handshake always completes, even when the upstream is down: the relay then accepts
and closes at once with 1013 ("try again later") and a reason that says why, and logs one line.
(A Prefect process whose events socket never completes its handshake hangs at exit, after its
flow has finished; a refused handshake would be retried at once by some clients.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from slotkeeper.gateway.proxy import Upstream, failure, forwarding_headers

log = logging.getLogger("slotkeeper.gateway")

#: Close codes: the upstream cannot be reached or went away (RFC 6455 registry: "Try Again Later").
TRY_AGAIN_LATER = 1013
NORMAL = 1000
#: Codes that must never be sent in a close frame (RFC 6455 7.4.1): said instead as ``NORMAL``.
_RESERVED = frozenset({1004, 1005, 1006, 1015})
#: Handshake headers of the client's connection, which the upstream connection makes its own.
_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
#: Longest close reason in a close frame: 125 bytes of payload less the 2-byte code.
_MAX_REASON = 123


class FrameFilter(Protocol):
    """What happens to a client's text frame on a relayed route before it goes upstream."""

    async def __call__(self, text: str) -> str | None:
        """The frame to forward (``text`` or a rewrite of it), or None to drop it."""
        ...


async def pass_through(text: str) -> str | None:
    """The default filter: every frame goes on unchanged."""
    return text


#: The filter of each relayed route, by path (``"/api/events/in"``); others: :func:`pass_through`.
FRAME_FILTERS: dict[str, FrameFilter] = {}


def frame_filter(path: str) -> FrameFilter:
    """The filter for text frames a client sends on ``path``."""
    return FRAME_FILTERS.get(path, pass_through)


def _reason(text: str) -> str:
    data = text.encode()
    if len(data) <= _MAX_REASON:
        return text
    return data[: _MAX_REASON - 3].decode(errors="ignore") + "..."


def _open(websocket: WebSocket) -> bool:
    return (
        websocket.client_state == WebSocketState.CONNECTED
        and websocket.application_state == WebSocketState.CONNECTED
    )


def _code(code: int | None) -> int:
    return NORMAL if code is None or code in _RESERVED else code


async def relay(upstream: Upstream, scope: Scope, receive: Receive, send: Send) -> None:
    """Relay one websocket between the client and the upstream (see the module's doc)."""
    websocket = WebSocket(scope, receive, send)
    offered: list[str] = list(scope.get("subprotocols") or ())
    headers = forwarding_headers(scope)
    for name in _HANDSHAKE:
        headers.popall(name, None)
    url = upstream.url_for(scope).with_scheme("wss" if upstream.url.scheme == "https" else "ws")
    try:
        remote = await upstream.session.ws_connect(
            url,
            protocols=offered,
            headers=headers,
            autoclose=False,  # the relay says the close of one side to the other
            autoping=True,
            max_msg_size=0,  # the upstream bounds its own frames
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        detail = _failure_reason(exc, upstream)
        log.warning("relaying the websocket %s to the upstream failed: %s", scope["path"], detail)
        await websocket.accept(subprotocol=offered[0] if offered else None)
        await websocket.close(TRY_AGAIN_LATER, reason=_reason(detail))
        return
    try:
        await websocket.accept(subprotocol=remote.protocol)
        await _pump(websocket, remote, frame_filter(scope["path"]))
    finally:
        if not remote.closed:
            await remote.close()


def _failure_reason(exc: BaseException, upstream: Upstream) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"The upstream refused the websocket: {exc.status} {exc.message}"
    return failure(exc, upstream).detail


async def _pump(websocket: WebSocket, remote: aiohttp.ClientWebSocketResponse, keep: FrameFilter) -> None:
    """Copy frames both ways until one side closes; then close the other alike."""
    upward = asyncio.create_task(_client_to_upstream(websocket, remote, keep))
    downward = asyncio.create_task(_upstream_to_client(websocket, remote))
    try:
        done, _ = await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (upward, downward):
            task.cancel()
        for task in (upward, downward):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for task in done:
        if task.exception() is not None:
            log.warning("websocket relay %s ended by an error: %r", websocket.url.path, task.exception())
    if _open(websocket):
        code = remote.close_code
        reason = "the upstream closed the websocket"
        if code is None or code == 1006:
            code, reason = TRY_AGAIN_LATER, "the upstream went away"
        with contextlib.suppress(Exception):  # the client may be gone at the same moment
            await websocket.close(_code(code), reason=_reason(reason))


async def _client_to_upstream(
    websocket: WebSocket, remote: aiohttp.ClientWebSocketResponse, keep: FrameFilter
) -> None:
    while True:
        message: Message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            await remote.close(
                code=_code(message.get("code")), message=(message.get("reason") or "").encode()
            )
            return
        text = message.get("text")
        if text is not None:
            kept = await keep(text)
            if kept is not None:
                await remote.send_str(kept)
        else:
            await remote.send_bytes(message.get("bytes") or b"")


async def _upstream_to_client(websocket: WebSocket, remote: aiohttp.ClientWebSocketResponse) -> None:
    while True:
        message = await remote.receive()
        if message.type is aiohttp.WSMsgType.TEXT:
            await websocket.send_text(message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await websocket.send_bytes(message.data)
        elif message.type is aiohttp.WSMsgType.CLOSE:
            code = _code(message.data)
            reason = message.extra or ""
            with contextlib.suppress(Exception):
                await remote.close(code=code)
            if _open(websocket):
                await websocket.close(code, reason=_reason(reason))
            return
        elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
            return
