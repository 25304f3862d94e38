"""The blocking SDK: ``with concurrency(...)`` and ``rate_limit(...)``.

A drop-in for ``prefect.concurrency.sync`` (same names, parameters, defaults and exceptions).
The work runs on the SDK's background loop (one per process); this thread only waits for it.
See :mod:`slotkeeper.sdk.asyncio` for the parameters and ``docs/sdk.md`` for the design.
"""

# Why the signatures of this module repeat those of ``slotkeeper.sdk.asyncio``: they are the
# public API, and written out they are what IDEs, ``help()`` and type checkers show (names,
# defaults, the keyword-only marker, each form's return type). The alternatives lose some of it:
# a signature copied by a decorator (a ``ParamSpec`` trick) reaches only the tools that evaluate
# types, and neither it nor a docstring assigned at import (``__doc__ = ...``) is seen by a reader
# of the source or by static tools. Prefect's own sync and async modules repeat theirs too. What
# is behind the signatures is written once: the parameters are documented in
# ``asyncio.concurrency``, and both forms only hand them to ``_blocks`` (``SyncConcurrency`` and
# ``AsyncConcurrency``, ``RateLimit``), which share everything but the waiting.

from __future__ import annotations

from typing import TYPE_CHECKING

from slotkeeper.sdk._blocks import Holder, Names, RateLimit, SyncConcurrency
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
    taking = RateLimit(names, occupy, timeout_seconds, strict, client, api_url)
    if taking.call is not None:
        taking.check(taking.call.result())
