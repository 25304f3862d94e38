"""The async SDK: ``async with concurrency(...)`` and ``await rate_limit(...)``.

A drop-in for ``prefect.concurrency.asyncio`` (same names, parameters, defaults and exceptions),
waiting on slotkeeper's server instead of polling it::

    from slotkeeper.sdk.asyncio import concurrency

    async with concurrency("db", occupy=1, timeout_seconds=30) as lease:
        ...  # lease.fencing_tokens["db"] orders this holder among the holders of "db"

See ``docs/sdk.md`` for the design and its guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slotkeeper.sdk._blocks import AsyncConcurrency, Holder, Names, RateLimit
from slotkeeper.sdk._core import GrantedLimit, Lease
from slotkeeper.sdk.errors import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencyLeaseLostError,
    ConcurrencySlotAcquisitionError,
)

if TYPE_CHECKING:
    from slotkeeper.client import SlotkeeperClient

__all__ = [
    "AcquireConcurrencySlotTimeoutError",
    "ConcurrencyLeaseLostError",
    "ConcurrencySlotAcquisitionError",
    "GrantedLimit",
    "Lease",
    "concurrency",
    "rate_limit",
]


def concurrency(
    names: Names,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    max_retries: int | None = None,
    lease_duration: float = 300,
    strict: bool = False,
    holder: Holder | None = None,
    raise_on_lease_renewal_failure: bool | None = None,
    *,
    priority: int = 0,
    client: SlotkeeperClient | None = None,
    api_url: str | None = None,
) -> AsyncConcurrency:
    """Hold ``occupy`` slots of every limit in ``names`` for the body of ``async with``.

    Args (Prefect's, same meaning):
        names: a limit name or a list of them; empty or None holds nothing.
        occupy: slots taken on each limit, all or none.
        timeout_seconds: give up after this long (``AcquireConcurrencySlotTimeoutError``, a
            ``TimeoutError``); None waits as long as it takes.
        max_retries: how many refusals (423) to accept before failing
            (``ConcurrencySlotAcquisitionError``); None: no bound.
        lease_duration: seconds the lease lives unless renewed; renewed in the background
            while the body runs.
        strict: raise ``ConcurrencySlotAcquisitionError`` if none of the limits exists
            (otherwise a warning is logged and the body runs holding nothing).
        holder: who holds the lease, ``{"type": "flow_run"|"task_run"|"deployment", "id": uuid}``
            (or Prefect's ``ConcurrencyLeaseHolder``).
        raise_on_lease_renewal_failure: if the lease is lost while the body runs, cancel the
            body and raise ``ConcurrencyLeaseLostError``; None: follow ``strict``.

    slotkeeper's additions (keyword only):
        priority: place in the server's queue while waiting (higher first, -1000 to 1000).
        client: a ``SlotkeeperClient`` naming the server and its auth (its URL and auth are
            used; the SDK keeps its own connections).
        api_url: the server's API URL; default ``SLOTKEEPER_API_URL``, else
            ``http://127.0.0.1:4200/api``; auth from ``SLOTKEEPER_API_AUTH_STRING``.

    ``async with`` gives a :class:`Lease` (its id, limits and fencing tokens).
    """
    return AsyncConcurrency(
        names,
        occupy,
        timeout_seconds,
        max_retries,
        lease_duration,
        strict,
        holder,
        raise_on_lease_renewal_failure,
        priority,
        client,
        api_url,
    )


async def rate_limit(
    names: Names,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: SlotkeeperClient | None = None,
    api_url: str | None = None,
) -> None:
    """Wait until ``occupy`` slots of every limit in ``names`` are taken in ``rate_limit`` mode.

    The limits need a slot decay; the slots come back by decay (nothing is released). Waits by
    sleeping the server's ``Retry-After``, which is exact for rate limits. ``strict``: raise
    ``ConcurrencySlotAcquisitionError`` if none of the limits exists. As Prefect's.
    """
    taking = RateLimit(names, occupy, timeout_seconds, strict, client, api_url)
    if taking.call is not None:
        taking.check(await taking.call.aresult())
