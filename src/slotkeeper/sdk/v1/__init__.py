"""Tag (v1) concurrency limits: ``concurrency(names, task_run_id)``, as ``prefect.concurrency.v1``.

:func:`concurrency` blocks (``with``); :func:`aconcurrency` is the ``async with`` form. The
modules :mod:`slotkeeper.sdk.v1.sync` and :mod:`slotkeeper.sdk.v1.asyncio` mirror Prefect's.
"""

from slotkeeper.sdk.errors import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
from slotkeeper.sdk.v1.asyncio import concurrency as aconcurrency
from slotkeeper.sdk.v1.sync import concurrency

__all__ = [
    "AcquireConcurrencySlotTimeoutError",
    "ConcurrencySlotAcquisitionError",
    "aconcurrency",
    "concurrency",
]
