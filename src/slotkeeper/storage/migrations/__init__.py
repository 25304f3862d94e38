"""Alembic migrations for both backends; run them with :func:`slotkeeper.storage.migrate`."""
