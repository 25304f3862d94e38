"""uvicorn's HTTP protocol (httptools), with a lost connection seen at once by the request.

uvicorn marks a request disconnected in ``connection_lost``, which the event loop runs one turn
*after* the connection ended: when the client's end of the stream arrives (a close, or the SDK's
half-close that withdraws a waiting request) or the connection fails, the transport is closed
right away and ``connection_lost`` is only scheduled. During that turn the request's
``receive`` still waits as if the client were there, and an answer the app sends is written into
the closed transport and dropped, silently (uvicorn's ``send`` returns as if it had been sent).
A grant answered in that turn reached nobody and stayed held until its lease expired; that was
the "lease no client ever saw" of ``tests/test_sdk.py`` (reproduced step by step in
``tests/test_undelivered.py``). uvicorn's h11 protocol behaves the same.

:class:`HttpToolsProtocol` closes that turn: a request's ``receive`` reports ``http.disconnect``
as soon as its connection is closing, the state uvicorn reaches a turn later. The app checks that
without yielding just before it writes a grant (:class:`slotkeeper.api.responses.LeaseAnswer`),
so a grant is either written into an open connection or released, never dropped.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http import httptools_impl


class _Receive:
    """A request's ``receive`` that sees a closing connection as the disconnect it is."""

    __slots__ = ("cycle", "receive")

    def __init__(self, cycle: httptools_impl.RequestResponseCycle) -> None:
        self.cycle = cycle
        self.receive = cycle.receive

    async def __call__(self) -> Any:
        cycle = self.cycle
        if not cycle.disconnected and not cycle.response_complete and cycle.transport.is_closing():
            # What ``connection_lost`` will say a turn later; from now on uvicorn's ``send`` drops
            # the answer knowingly, and the app, asking first, does not send one.
            cycle.disconnected = True
        return await self.receive()


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests see a closing connection at once (see the
    module's doc)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # A new request's cycle (started now, or queued behind a pipelined one); its task has not
        # run yet, so the ``receive`` it passes to the app is this one. Nothing new after an
        # upgrade: the cycle is the previous request's, already wrapped.
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.receive, _Receive):
            cycle.receive = _Receive(cycle)  # type: ignore[method-assign]
