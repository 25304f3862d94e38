"""Server settings: one object, read from ``SLOTKEEPER_*`` environment variables.

Every knob of the server is a field here; nothing else reads the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL


def _upstream_url(url: str) -> str:
    """``url`` checked as an upstream's API URL (http or https, with a host), without its last ``/``."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises on a port out of range)
        host = URL(parts.geturl()).host if parts.scheme in ("http", "https") else None
    except ValueError as exc:
        raise ValueError(f"upstream_url is not a URL ({exc}): {url!r}") from None
    if parts.scheme not in ("http", "https") or not host or not re.fullmatch(r"[^\s/<>\"{}|\\^`]+", host):
        raise ValueError(f"upstream_url must be an http:// or https:// URL with a host, not {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream_url must not have a query or fragment: {url!r}")
    return parts.geturl().rstrip("/")


def default_home() -> Path:
    """``~/.slotkeeper``: where the embedded database lives unless told otherwise."""
    return Path.home() / ".slotkeeper"


class Settings(BaseSettings):
    """All server settings. Environment variable = ``SLOTKEEPER_`` + the field name, upper case."""

    model_config = SettingsConfigDict(env_prefix="SLOTKEEPER_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="Folder of the embedded database.")
    database_url: str | None = Field(
        default=None,
        description="sqlite:///PATH or postgresql://USER@HOST:PORT/DB. Default: SQLite under home.",
    )
    host: str = Field(default="127.0.0.1", description="Address to bind; loopback unless told.")
    port: int = Field(default=4200, ge=0, le=65535)
    api_auth_string: str | None = Field(
        default=None,
        description="When set, every request but health needs HTTP basic auth with this string "
        "(as Prefect's PREFECT_SERVER_API_AUTH_STRING: 'user:password').",
    )
    lease_min_seconds: float = Field(default=60.0, gt=0)
    lease_max_seconds: float = Field(default=86400.0, gt=0)
    reaper_interval_seconds: float = Field(
        default=0.25, gt=0, le=60, description="How often expired leases are reclaimed."
    )
    reaper_batch_size: int = Field(default=500, ge=1)
    maximum_slot_wait_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Cap of Retry-After (Prefect's maximum_concurrency_slot_wait_seconds).",
    )
    tag_slot_wait_seconds: float = Field(
        default=10.0, ge=0, description="Cap of Retry-After for tag: limits."
    )
    v1_hold_ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        le=100 * 365 * 86400,
        description="Lifetime of a tag-based (v1) hold. v1 clients cannot renew; unset, a hold "
        "lasts 100 years (Prefect). Set, an abandoned hold expires and the reaper frees its slots.",
    )
    max_wait_seconds: float = Field(
        default=3600.0, gt=0, description="Longest server-side wait a request may ask for (wait_seconds)."
    )
    api_default_limit: int = Field(default=200, ge=1, description="Default and maximum page size.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    events_retention_seconds: float = Field(
        default=7 * 86400, gt=0, description="Events older than this are deleted (by occurred)."
    )
    events_retention_interval_seconds: float = Field(
        default=300.0, gt=0, description="How often the retention job runs."
    )
    events_max_backfill_seconds: float = Field(
        default=900.0, ge=0, description="How far back a websocket subscriber's backfill reaches."
    )
    events_subscriber_queue_size: int = Field(
        default=10_000, ge=1, description="Events a live subscriber may lag before it is cut off."
    )
    pool_size: int = Field(default=8, ge=1, le=256, description="PostgreSQL connections per process.")
    hot_path: bool = Field(
        default=True,
        description="Serve acquire/release/renew/health ahead of FastAPI's middleware stack and "
        "dependency solving (api/hotpath.py). False serves them through FastAPI's own stack, to "
        "measure the difference (docs/benchmarks.md). The answers are the same, but for the wording "
        "of the 422 details of a body that is not a JSON object.",
    )
    log_level: str = Field(default="info")
    log_format: Literal["text", "json"] = Field(
        default="text", description="Server logs as text lines or as one JSON object per line."
    )
    access_log: bool = Field(default=False, description="Log one line per HTTP request.")
    metrics_enabled: bool = Field(default=True, description="Serve Prometheus metrics at GET /metrics.")
    metrics_open: bool = Field(
        default=False, description="Serve /metrics without auth even when api_auth_string is set."
    )
    metrics_max_limits: int = Field(
        default=100,
        ge=0,
        le=100_000,
        description="Limits with series of their own in /metrics; the others are summed as limit='_other'.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="On SIGTERM, how long requests in flight may take before the server exits.",
    )
    detached_waiter_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="How long a waiter answered 503 at shutdown keeps its place in the queue.",
    )
    max_names: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Most limit names (or tags) one acquire or release may name; more is a 422.",
    )

    websocket_auth_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="How long an events websocket may take to send its handshake messages (auth, "
        "then filter) before it is closed with 1008.",
    )

    events_subscriber_queue_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Bytes of events (about their JSON size) a live subscriber may lag before it "
        "is cut off, whichever of this and events_subscriber_queue_size comes first.",
    )

    events_filter_max_values: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Values in one list of an events filter (ids, prefixes, names, roles, pairs, "
        "event ids, one label's patterns) and labels in one labels object; more is a 422.",
    )
    events_filter_max_resource_filters: int = Field(
        default=16,
        ge=1,
        le=100,
        description="Entries in an events filter's related list, and in its any_resource list.",
    )
    events_filter_max_string_length: int = Field(
        default=1024,
        ge=16,
        le=1_000_000,
        description="Characters in one value, label name or label pattern of an events filter.",
    )

    events_pool_size: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Connections (and threads) of the pool that runs event queries, apart from "
        "the pool of acquisitions: slow event queries can never hold up an acquire.",
    )
    events_query_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long one event query may run before the database stops it (504 query_timeout).",
    )

    background_max_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Failures of one background loop (reaper, retention, event listener, "
        "checkpointer) within the window that make GET /api/ready answer 503.",
    )
    background_failure_window_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="The window in which background_max_failures are counted.",
    )

    upstream_url: str | None = Field(
        default=None,
        description="Gateway mode: the API URL of the Prefect server behind slotkeeper "
        "(http://prefect-host:4200/api). slotkeeper answers concurrency itself and forwards every "
        "other /api request there (docs/gateway.md). Unset: no forwarding.",
    )
    upstream_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Gateway: how long a forwarded request may wait for the upstream's answer, and "
        "for each read of its body, before it is answered 504 upstream_timeout.",
    )
    upstream_connect_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="Gateway: how long connecting to the upstream may take before a forwarded "
        "request is answered 504 upstream_timeout (a refused connection: 502 at once).",
    )
    upstream_max_connections: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Gateway: open connections to the upstream at most (HTTP pool; websockets "
        "have a connection each, outside it). A request waits for a free one within the timeouts.",
    )
    cors_allowed_origins: str = Field(
        default="*",
        description="Gateway: the origins (comma-separated) whose browsers may call slotkeeper's own "
        "routes, as Prefect's PREFECT_SERVER_CORS_ALLOWED_ORIGINS (give both the same value).",
    )
    upstream_auth_string: str | None = Field(
        default=None,
        description="Gateway: HTTP basic auth ('user:password') of slotkeeper's own requests to the "
        "upstream (the outbox's deliveries), when the upstream requires it "
        "(PREFECT_SERVER_API_AUTH_STRING). Forwarded requests carry their clients' own.",
    )
    outbox_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Gateway: events per delivery to the upstream at most."
    )
    outbox_context_wait_seconds: float = Field(
        default=1.5,
        ge=0,
        le=60,
        description="Gateway: how long after its grant a slot event may wait for the client copy that "
        "names its run (flow run, task run...) before it is delivered without it; the events behind it "
        "wait too (order). 0: never wait.",
    )
    outbox_context_entries: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Gateway: client copies of slot events (and run contexts given) kept in memory at most.",
    )
    outbox_lease_seconds: float = Field(
        default=15.0,
        ge=1,
        le=3600,
        description="Gateway: the delivery lease; another process takes over delivery this long after "
        "the delivering one stopped without freeing it.",
    )
    outbox_max_backoff_seconds: float = Field(
        default=30.0, ge=0.1, le=3600, description="Gateway: longest wait between deliveries that fail."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.lease_min_seconds > self.lease_max_seconds:
            raise ValueError("lease_min_seconds must not exceed lease_max_seconds")
        if self.upstream_url is not None:
            self.upstream_url = _upstream_url(self.upstream_url)
        return self

    @property
    def cors_origins(self) -> list[str]:
        """``cors_allowed_origins`` as a list."""
        return [origin.strip() for origin in self.cors_allowed_origins.split(",") if origin.strip()]

    @property
    def resolved_database_url(self) -> str:
        """The database URL, with the embedded default filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'slotkeeper.db'}"
