"""Prefect's event websockets: ``/api/events/in`` (ingest) and ``/api/events/out`` (subscribe).

Handshake as Prefect (reference §6.8): a client offering the ``prefect`` subprotocol must send
``{"type": "auth", "token": ...}`` first and gets ``{"type": "auth_success"}``; without the
subprotocol it is accepted in legacy mode only when no auth is configured.

``/out`` subscribes to the live stream *before* it backfills from the store, then skips live
events it already sent, so nothing falls in between and nothing is sent twice. Unlike Prefect,
the whole filter (``related`` included) applies to the live stream. A subscriber that falls
``events_subscriber_queue_size`` events (or ``events_subscriber_queue_bytes`` bytes) behind is
disconnected with close code 1013 and a reason, and counted; it never slows the server down.

Bounds on what a client may make the server hold (docs/configuration.md#resource-bounds): the
handshake messages (``auth``, then ``/out``'s ``filter``) must arrive within
``websocket_auth_timeout_seconds`` of the upgrade (else close 1008), so unauthenticated sockets
cannot pile up; a binary frame, which neither endpoint speaks, closes with 1003.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from slotkeeper.api.events import filter_bounds
from slotkeeper.api.middleware import cross_origin
from slotkeeper.errors import QueryTimeout
from slotkeeper.events import filters
from slotkeeper.events.broker import OVERFLOWED, OVERFLOWED_BYTES, Broker, Subscription
from slotkeeper.events.models import Event, EventFilter, EventOrder, EventRecord, check_size
from slotkeeper.settings import Settings
from slotkeeper.storage.events import EventStore, unstorable

log = logging.getLogger("slotkeeper.api.websockets")

router = APIRouter(tags=["Events"])

POLICY_VIOLATION = 1008
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TRY_AGAIN_LATER = 1013
UNSUPPORTED_DATA = 1003
BACKFILL_PAGE_SIZE = 250


def _reason(text: str) -> str:
    """Close reasons are limited to 123 bytes."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        await websocket.close(code, reason=_reason(reason))


class BinaryFrame(Exception):
    """The client sent a binary frame where these endpoints take JSON text (close 1003)."""


class HandshakeTimeout(Exception):
    """The handshake messages did not arrive within ``websocket_auth_timeout_seconds`` (1008)."""


async def accept(websocket: WebSocket, settings: Settings) -> bool:
    """Prefect's handshake; True when the socket is open and authenticated.

    :class:`HandshakeTimeout` when the auth message is not there within the setting's deadline
    (the caller closes the socket: see :func:`_refuse`)."""
    offered = [
        part.strip()
        for header in websocket.headers.getlist("sec-websocket-protocol")
        for part in header.split(",")
    ]
    secret = settings.api_auth_string
    if "prefect" not in offered:
        if secret:
            await websocket.close(PROTOCOL_ERROR)
            return False
        await websocket.accept()  # legacy clients: no handshake messages
        return True
    await websocket.accept(subprotocol="prefect")
    message = await _handshake_message(websocket, settings)
    if not isinstance(message, dict) or message.get("type") != "auth":
        await _close(websocket, POLICY_VIOLATION, "Expected 'auth' message")
        return False
    if secret:
        token = message.get("token")
        if not token:
            await _close(websocket, POLICY_VIOLATION, "Auth required but no token provided")
            return False
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), secret.encode()):
            await _close(websocket, POLICY_VIOLATION, "Invalid token")
            return False
    await websocket.send_json({"type": "auth_success"})
    return True


async def _receive_text(websocket: WebSocket) -> str:
    """The next text frame: :class:`BinaryFrame` for a binary one (Starlette's
    ``receive_text`` would raise ``KeyError``), ``WebSocketDisconnect`` when the client left."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is None:
        raise BinaryFrame
    return str(text)


async def _receive_json(websocket: WebSocket) -> Any:
    try:
        return orjson.loads(await _receive_text(websocket))
    except orjson.JSONDecodeError:
        return None


async def _handshake_message(websocket: WebSocket, settings: Settings) -> Any:
    """A handshake message (``auth``, ``filter``), read within the handshake's deadline."""
    try:
        async with asyncio.timeout(settings.websocket_auth_timeout_seconds):
            return await _receive_json(websocket)
    except TimeoutError:
        raise HandshakeTimeout from None


async def _refuse(websocket: WebSocket, exc: BinaryFrame | HandshakeTimeout, settings: Settings) -> None:
    if isinstance(exc, BinaryFrame):
        await _close(websocket, UNSUPPORTED_DATA, "Binary frames are not supported: send JSON text")
    else:
        seconds = settings.websocket_auth_timeout_seconds
        await _close(websocket, POLICY_VIOLATION, f"Handshake not completed within {seconds:g} s")


@router.websocket("/events/in")
async def events_in(websocket: WebSocket) -> None:
    """Ingest events, one JSON event per text frame; an invalid one closes with 1007."""
    settings: Settings = websocket.app.state.settings
    store: EventStore = websocket.app.state.events
    if cross_origin(websocket.headers.get("origin"), websocket.headers.get("host")):
        # A page of another site may not write events (and so take nothing in anyone's name).
        await websocket.close(POLICY_VIOLATION, reason="Events are not sent from web pages of other sites")
        return
    try:
        if not await accept(websocket, settings):
            return
        while True:
            text = await _receive_text(websocket)
            try:
                event = Event.model_validate_json(text)
                check_size(event)
            except (ValidationError, ValueError) as exc:
                await _close(websocket, INVALID_DATA, f"Invalid event: {_first_error(exc)}")
                return
            record = EventRecord.from_event(event, time.time())
            problem = unstorable(record)
            if problem:
                await _close(websocket, INVALID_DATA, f"Invalid event: {problem}")
                return
            await store.ingest([record])
    except (BinaryFrame, HandshakeTimeout) as exc:
        await _refuse(websocket, exc, settings)
    except WebSocketDisconnect:
        return


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        return f"{where}: {error['msg']}" if where else str(error["msg"])
    return str(exc)


@router.websocket("/events/out")
async def events_out(websocket: WebSocket) -> None:
    """Stream events matching a filter: optional backfill, then live, each event once."""
    settings: Settings = websocket.app.state.settings
    store: EventStore = websocket.app.state.events
    broker: Broker = websocket.app.state.broker
    try:
        if not await accept(websocket, settings):
            return
        message = await _handshake_message(websocket, settings)
        if not isinstance(message, dict) or message.get("type") != "filter":
            await _close(websocket, PROTOCOL_ERROR, "Expected 'filter' message")
            return
        try:
            event_filter = EventFilter.model_validate(message.get("filter") or {})
        except ValidationError as exc:
            await _close(websocket, PROTOCOL_ERROR, f"Invalid filter: {_first_error(exc)}")
            return
        try:
            filters.check_bounds(event_filter, filter_bounds(settings))
        except filters.FilterTooLarge as exc:
            await _close(websocket, POLICY_VIOLATION, f"Filter too large: {exc.detail}")
            return
        if "until" not in ((message.get("filter") or {}).get("occurred") or {}):
            # An unbounded subscription: Prefect's default ``until`` (now) would end the live
            # stream before it starts; its own subscriber sends now + 365 days for this reason.
            event_filter.occurred.until = datetime.now(UTC) + timedelta(days=365 * 100)
        earliest = datetime.now(UTC) - timedelta(seconds=settings.events_max_backfill_seconds)
        event_filter.occurred.since = max(event_filter.occurred.since, earliest)
        event_filter.order = EventOrder.ASC

        subscription = broker.subscribe(filters.matcher(event_filter))
        try:
            sent: set[str] = set()
            if message.get("backfill", True):
                backfill = event_filter.model_copy(deep=True)
                backfill.occurred.until = min(backfill.occurred.until, datetime.now(UTC))
                offset = 0
                while True:
                    page, _ = await store.query(backfill, BACKFILL_PAGE_SIZE, offset)
                    for record in page:
                        sent.add(record.id)
                        await websocket.send_text(_frame(record))
                    if len(page) < BACKFILL_PAGE_SIZE:
                        break
                    offset += len(page)
            await _stream(websocket, broker, subscription, sent)
        finally:
            broker.unsubscribe(subscription)
    except (BinaryFrame, HandshakeTimeout) as exc:
        await _refuse(websocket, exc, settings)
    except QueryTimeout as exc:  # the backfill's query ran past its deadline
        await _close(websocket, POLICY_VIOLATION, str(exc))
    except WebSocketDisconnect:
        return


async def _stream(websocket: WebSocket, broker: Broker, subscription: Subscription, sent: set[str]) -> None:
    """Send live events until the subscription ends or the client leaves.

    A task reads what the client sends (ignored, as Prefect does) and ends the subscription when
    the client disconnects, so one that leaves while no event flows is noticed at once (its
    subscription would leak otherwise), and the loop itself only waits on the queue: no task or
    ``asyncio.wait`` per event (measured: a subscriber to every event costs the server about a
    fifth of its acquire + release throughput, see docs/benchmarks.md).
    """
    left = False

    async def watch() -> None:
        nonlocal left
        with contextlib.suppress(Exception):  # a closed socket: the client is gone all the same
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
        left = True
        subscription.close()

    watcher = asyncio.ensure_future(watch())
    try:
        while True:
            record = await subscription.next()
            if left:  # what is still queued has nobody to go to
                return
            if record is None:
                if subscription.ended == OVERFLOWED:
                    reason = f"Subscriber too slow: more than {broker.queue_size} events queued"
                elif subscription.ended == OVERFLOWED_BYTES:
                    reason = f"Subscriber too slow: more than {broker.queue_bytes} bytes queued"
                else:
                    reason = "Event stream interrupted; subscribe again to backfill"
                await _close(websocket, TRY_AGAIN_LATER, reason)
                return
            if record.id in sent:
                sent.discard(record.id)
                continue
            await websocket.send_text(_frame(record))
    finally:
        watcher.cancel()


def _frame(record: EventRecord) -> str:
    return orjson.dumps({"type": "event", "event": record.wire()}).decode()
