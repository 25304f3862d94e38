"""The HTTP API: an ASGI app built by :func:`slotkeeper.api.app.create_app`."""
