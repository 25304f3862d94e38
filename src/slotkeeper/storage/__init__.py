"""Storage: one interface (:class:`Storage`), two backends chosen by the database URL.

``sqlite:///PATH`` selects :class:`~slotkeeper.storage.sqlite.SQLiteBackend` (embedded, one
server process); ``postgresql://...`` selects
:class:`~slotkeeper.storage.postgres.PostgresBackend` (any number of server processes).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from slotkeeper.domain import RetryPolicy
from slotkeeper.storage.backend import Backend
from slotkeeper.storage.core import Storage

__all__ = ["Backend", "Storage", "migrate", "open_storage", "parse_url"]

_MIGRATIONS = Path(__file__).parent / "migrations"
#: Key of the PostgreSQL advisory lock that serialises migrations of concurrent server starts.
_MIGRATION_LOCK_KEY = 0x510_7EE9


def parse_url(url: str) -> tuple[str, str]:
    """Split a database URL into (backend name, driver target): a file path or a conninfo."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"Not a database URL: {url!r} (expected sqlite:///PATH or postgresql://...)")
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        return "sqlite", path or ":memory:"
    if base in ("postgresql", "postgres"):
        return "postgresql", f"postgresql://{rest}"
    raise ValueError(f"Unsupported database URL scheme {scheme!r}: use sqlite or postgresql")


def _sqlalchemy_url(url: str) -> str:
    kind, target = parse_url(url)
    if kind == "sqlite":
        return f"sqlite:///{target}"
    return "postgresql+psycopg://" + target.removeprefix("postgresql://")


def migrate(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database at ``url`` to ``revision`` (creating the SQLite file if needed).

    Returns the schema's revision before and after (before is None: there was no schema).
    """
    kind, target = parse_url(url)
    if kind == "sqlite" and target != ":memory:":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(_sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            if kind == "postgresql":
                # Several server processes may start at once; one migrates, the others wait.
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            config = Config()
            config.set_main_option("script_location", str(_MIGRATIONS))
            config.attributes["connection"] = connection
            before = MigrationContext.configure(connection).get_current_revision()
            command.upgrade(config, revision)
            after = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    return before, after


def open_storage(
    url: str,
    *,
    pool_size: int = 8,
    retry_policy: RetryPolicy | None = None,
    events_pool_size: int = 2,
    events_query_timeout: float = 30.0,
) -> Storage:
    """Open the storage at ``url`` (already migrated). Event queries run on ``events_pool_size``
    connections of their own, each stopped after ``events_query_timeout`` seconds."""
    kind, target = parse_url(url)
    backend: Backend
    if kind == "sqlite":
        from slotkeeper.storage.sqlite import SQLiteBackend

        backend = SQLiteBackend(target, events_pool_size=events_pool_size, query_timeout=events_query_timeout)
    else:
        from slotkeeper.storage.postgres import PostgresBackend

        backend = PostgresBackend(
            target, pool_size=pool_size, events_pool_size=events_pool_size, query_timeout=events_query_timeout
        )
    return Storage(backend, retry_policy=retry_policy)
