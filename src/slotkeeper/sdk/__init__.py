"""slotkeeper's Python SDK: hold slots of named limits around a block of code.

Prefect's ``prefect.concurrency`` API (same names, parameters and exceptions), on slotkeeper's
server: acquisitions wait in the server's fair queue instead of polling, leases are renewed by
one background thread per process, and a cancelled caller never leaves a lease behind::

    from slotkeeper.sdk import concurrency, aconcurrency

    with concurrency("db", occupy=2, timeout_seconds=60):
        ...

    async with aconcurrency(["db", "api"]) as lease:
        ...

Modules shaped like Prefect's: :mod:`slotkeeper.sdk.sync`, :mod:`slotkeeper.sdk.asyncio`, and
for tag limits :mod:`slotkeeper.sdk.v1`. Design and guarantees: ``docs/sdk.md``.
"""

from slotkeeper.sdk._core import GrantedLimit, Lease
from slotkeeper.sdk.asyncio import concurrency as aconcurrency
from slotkeeper.sdk.asyncio import rate_limit as arate_limit
from slotkeeper.sdk.errors import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencyLeaseLostError,
    ConcurrencySlotAcquisitionError,
)
from slotkeeper.sdk.sync import concurrency, rate_limit

__all__ = [
    "AcquireConcurrencySlotTimeoutError",
    "ConcurrencyLeaseLostError",
    "ConcurrencySlotAcquisitionError",
    "GrantedLimit",
    "Lease",
    "aconcurrency",
    "arate_limit",
    "concurrency",
    "rate_limit",
]
