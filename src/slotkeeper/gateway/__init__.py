"""Gateway mode: slotkeeper in front of a Prefect server (``SLOTKEEPER_UPSTREAM_URL``)."""
