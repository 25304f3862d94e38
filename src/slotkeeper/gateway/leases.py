"""Renewals of leases that the upstream holds: deployment concurrency.

A deployment with a ``concurrency_limit`` is limited by the upstream Prefect server itself: it
takes a slot of its own limit ``deployment:<id>``, under a lease in its own lease storage, when the
flow run enters Pending (a rule on its state transitions), and frees it when the run ends. The
flow run renews that lease while it runs, with the route slotkeeper answers,
``POST /api/v2/concurrency_limits/leases/{id}/renew``, and stops itself when the renewal fails.

So in gateway mode a renewal is tried here first, and one of a lease slotkeeper does not hold
(its own answer is ``410 lease_gone``) is sent on to the upstream, whose answer the client gets:
204 for a deployment's lease, its own 404/410 for a lease nobody holds; 502/504 when it cannot be
asked. The gateway never needs to know which leases are whose (lease ids are random UUIDs, so a
lease is in one store or the other), and renewals of slotkeeper's own leases cost only the check
of their path.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slotkeeper.gateway.proxy import ClientGone, Upstream, forward, read_body

_PREFIX = "/api/v2/concurrency_limits/leases/"
_SUFFIX = "/renew"


def is_renewal(scope: Scope) -> bool:
    """Whether the request renews a lease (``POST .../leases/{id}/renew``)."""
    path: str = scope["path"]
    return scope["method"] == "POST" and path.endswith(_SUFFIX) and path.startswith(_PREFIX)


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands over ``body`` once, then waits for the client to disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def renew(app: ASGIApp, upstream: Upstream, scope: Scope, receive: Receive, send: Send) -> None:
    """Renew here; a lease slotkeeper does not hold is renewed on the upstream (module's doc)."""
    try:
        body = await read_body(receive)
    except ClientGone:
        return
    answer: list[Message] = []

    async def keep(message: Message) -> None:
        answer.append(message)

    await app(scope, _replay(body), keep)
    if answer and answer[0]["type"] == "http.response.start" and answer[0]["status"] == 410:
        await forward(upstream, scope, _replay(body), send)
        return
    for message in answer:
        await send(message)
