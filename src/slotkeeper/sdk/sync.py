"""The blocking SDK: ``with concurrency(...)`` and ``rate_limit(...)``.

A drop-in for ``prefect.concurrency.sync`` (same names, parameters, defaults and exceptions).
The work runs on the SDK's background loop (one per process); this thread only waits for it.
See :mod:`slotkeeper.sdk.asyncio` for the parameters and ``docs/sdk.md`` for the design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slotkeeper.sdk import _core
from slotkeeper.sdk._blocks import Holder, Names, SyncConcurrency, as_names, target
from slotkeeper.sdk._core import GrantedLimit, Lease
from slotkeeper.sdk._runtime import runtime
from slotkeeper.sdk.asyncio import _rate_checked
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
) -> SyncConcurrency:
    """Hold ``occupy`` slots of every limit in ``names`` for the body of ``with``.

    The parameters are those of :func:`slotkeeper.sdk.asyncio.concurrency`. If the lease is lost
    while the body runs and ``raise_on_lease_renewal_failure`` (or ``strict``) holds,
    ``ConcurrencyLeaseLostError`` is raised in this thread at its next Python instruction.
    """
    return SyncConcurrency(
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


def rate_limit(
    names: Names,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: SlotkeeperClient | None = None,
    api_url: str | None = None,
) -> None:
    """Block until ``occupy`` slots of every limit in ``names`` are taken in ``rate_limit`` mode
    (see :func:`slotkeeper.sdk.asyncio.rate_limit`)."""
    wanted = as_names(names)
    if not wanted:
        return
    key = target(client, api_url)
    rt = runtime()
    limits = rt.call(_core.take_rate(rt, key, wanted, occupy, timeout_seconds)).result()
    _rate_checked(wanted, limits, strict)
