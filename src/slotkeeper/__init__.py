"""slotkeeper: named concurrency limits with durable leases, speaking Prefect's API."""

__version__ = "0.1.0"
