"""Which requests a gateway answers itself and which it forwards to the upstream (pure).

In gateway mode (``SLOTKEEPER_UPSTREAM_URL`` set), slotkeeper stands where Prefect's clients
expect Prefect's server. It answers concurrency itself, from its own database, and forwards every
other request under ``/api`` to the upstream Prefect server. The table below is the one place that
decides which is which; docs/gateway.md shows it to users.

Two kinds of rule, so that no rule claims more of the upstream's API than slotkeeper serves:

- *Namespaces* that are slotkeeper's alone, claimed with everything under them. The two
  concurrency-limit APIs are among them on purpose: every request there, even one slotkeeper
  does not implement (answered 404/405 here), must not reach the upstream's own concurrency
  state, which is not the one the limits are enforced on.
- *Single paths* inside namespaces the upstream shares: ``/api/health``, ``/api/ready``,
  ``/api/csrf-token`` (answered from the gateway, see :mod:`slotkeeper.gateway.csrf`) and
  slotkeeper's own API docs. ``/api/admin/...`` is the upstream's: slotkeeper owns nothing
  there, so ``/api/admin/version`` tells the client the version of the Prefect server it really
  talks to (Prefect's client refuses a server of another major version).

Events are forwarded (``/api/events``, ``/api/events/filter``, ``/api/events/in``,
``/api/events/out``): the upstream holds flow-run and task-run events, and receives every slot
event slotkeeper commits through its outbox, so it answers every events query exactly once.

Paths outside ``/api`` (``/metrics``, ``/dashboard``) are slotkeeper's and never forwarded.
"""

from __future__ import annotations

#: The API's prefix on the gateway (slotkeeper's routes and the forwarded ones alike).
API = "/api"

#: Namespaces that are slotkeeper's with everything under them (a path equal to one, or
#: continuing it with ``/``).
OWNED_NAMESPACES: tuple[str, ...] = (
    "/api/v2/concurrency_limits",  # Prefect's v2 limits and leases, slotkeeper's views and stats
    "/api/concurrency_limits",  # Prefect's v1 (tag-based) limits
    "/api/slotkeeper",  # the SDK's session websocket
    "/api/live",  # the dashboard's server-sent views
)

#: Single paths that slotkeeper answers inside namespaces the upstream serves too.
OWNED_PATHS: frozenset[str] = frozenset(
    {
        "/api/health",
        "/api/ready",
        "/api/csrf-token",  # the gateway's answer, mirroring the upstream's CSRF setting
        "/api/docs",  # slotkeeper's OpenAPI pages (the upstream's: on its own address)
        "/api/openapi.json",
    }
)

_PREFIXES = tuple(p + "/" for p in OWNED_NAMESPACES)
_NAMESPACES = frozenset(OWNED_NAMESPACES)


def answered_here(path: str) -> bool:
    """Whether slotkeeper answers a request for ``path`` itself in gateway mode (any method).

    Cheap: a prefix test and two set lookups, since every request of the hot path asks it.
    """
    if path.startswith(_PREFIXES):
        return True
    return path in OWNED_PATHS or path in _NAMESPACES or not (path == API or path.startswith("/api/"))


def forwarded(path: str) -> bool:
    """Whether a request for ``path`` goes to the upstream in gateway mode."""
    return not answered_here(path)


def upstream_path(path: str, upstream_base: str) -> str:
    """The upstream's path for a gateway ``path`` under ``/api``: its ``/api`` replaced by the
    upstream URL's own path (``upstream_base``, e.g. ``/api`` or ``/prefect/api``)."""
    if not (path == API or path.startswith("/api/")):
        raise ValueError(f"{path!r} is not under {API}")
    return upstream_base.rstrip("/") + path[len(API) :]
