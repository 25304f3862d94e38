"""slotkeeper: named concurrency limits with durable leases, speaking Prefect's API.

The client side is the SDK (``slotkeeper.sdk``); its main names are re-exported here lazily, so
that importing the server never loads the SDK and the SDK's modules never import in a cycle.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_SDK = frozenset(
    {
        "concurrency",
        "rate_limit",
        "aconcurrency",
        "arate_limit",
        "ConcurrencySlotAcquisitionError",
        "AcquireConcurrencySlotTimeoutError",
        "ConcurrencyLeaseLostError",
        "Lease",
        "GrantedLimit",
    }
)

__all__ = ["__version__", *sorted(_SDK)]


def __getattr__(name: str) -> Any:
    if name in _SDK:
        from slotkeeper import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'slotkeeper' has no attribute {name!r}")
