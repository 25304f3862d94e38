"""JSON answers serialised with orjson (a fraction of the cost of FastAPI's encoder), and the
answer that hands a lease to its client (:class:`LeaseAnswer`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import orjson
from fastapi import Response
from starlette.types import Message, Receive, Scope, Send

#: The status logged for a request whose client left before its answer (nginx's convention).
CLIENT_LEFT = 499


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response with ``content`` serialised by orjson."""
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type="application/json")


def lost_already(receive: Receive) -> bool:
    """Whether the server already knows the request's client is gone, found without yielding to
    the loop (Starlette's ``is_disconnected`` yields, and the connection could be lost meanwhile).

    The request's body must have been read: ``receive`` then either returns the disconnect at once
    (the server knows) or would wait for one; its first step tells which, and a wait is abandoned.
    With slotkeeper's server protocol (:mod:`slotkeeper.api.protocol`) a connection that is
    closing counts as lost, so an answer sent right after ``False`` goes into an open connection.
    """
    receiving = cast(Coroutine[Any, Any, Message], receive())
    try:
        receiving.send(None)
    except StopIteration as answered:
        return bool(answered.value["type"] == "http.disconnect")
    receiving.close()
    return False


class LeaseAnswer(Response):
    """The 200 that gives a lease to its client; if the client is gone when it is about to be
    written, the lease is released instead (its ``released`` events written, the next waiter
    admitted): written into a lost connection, it would reach nobody and hold its slots until it
    expired.

    The check is made at the last moment, without yielding before the write: a disconnect that
    comes after it is the client's to handle (slotkeeper's SDK half-closes to withdraw and still
    reads an answer on its way). Over a session the answer is not written by this class but
    carried in a message, whose acknowledgements cover the same case (:mod:`slotkeeper.api.session`).
    """

    def __init__(self, content: Any, lease_id: str, release: Callable[[str], Awaitable[object]]) -> None:
        super().__init__(orjson.dumps(content), media_type="application/json")
        self.lease_id = lease_id
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not lost_already(receive):
            await super().__call__(scope, receive, send)
            return
        # Shielded: the release completes even if the request's task is cancelled meanwhile.
        await asyncio.shield(self.release(self.lease_id))
        # Dropped by the server (the client is gone); the access log and metrics show the 499.
        await Response(status_code=CLIENT_LEFT)(scope, receive, send)
