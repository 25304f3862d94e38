"""Which requests a gateway answers itself and which go to the upstream (gateway/routes.py)."""

from __future__ import annotations

import pytest

from slotkeeper.api.app import create_app
from slotkeeper.gateway.routes import answered_here, forwarded, upstream_path
from slotkeeper.settings import Settings

#: Paths a Prefect flow run, flow.serve() and run_deployment use (measured on Prefect 3.8.8), and
#: what the UI reads: all the upstream's.
UPSTREAM = [
    "/api/flows/",
    "/api/flows/filter",
    "/api/flow_runs/",
    "/api/flow_runs/0b8a6c1e-5c36-4a8e-9b1c-2f7d2f4e9a10",
    "/api/flow_runs/0b8a6c1e-5c36-4a8e-9b1c-2f7d2f4e9a10/set_state",
    "/api/flow_runs/filter",
    "/api/task_runs/",
    "/api/task_runs/filter",
    "/api/deployments/",
    "/api/deployments/name/flow/deploy",
    "/api/deployments/get_scheduled_flow_runs",
    "/api/logs/",
    "/api/logs/out",
    "/api/automations/filter",
    "/api/admin/storage",
    "/api/admin/version",  # the version of the Prefect server the client really talks to
    "/api/admin/settings",
    "/api/events",
    "/api/events/in",
    "/api/events/out",
    "/api/events/filter",
    "/api/events/filter/next",
    "/api/events/count-by/event",
    "/api/task_runs/subscriptions/scheduled",
    "/api/work_pools/default/get_scheduled_flow_runs",
    "/api/ui/flow_runs/history",
    "/api/ui-settings",  # not a slotkeeper namespace although it starts like one
    "/api/healthz",
    "/api/csrf-token/x",
    "/api/v2/variables/filter",
    "/api/v2/concurrency_limitsx",
    "/api/concurrency_limits_v3",
    "/api/",
    "/api",
]

#: What slotkeeper answers itself.
HERE = [
    "/api/health",
    "/api/ready",
    "/api/csrf-token",
    "/api/v2/concurrency_limits/",
    "/api/v2/concurrency_limits",
    "/api/v2/concurrency_limits/filter",
    "/api/v2/concurrency_limits/increment-with-lease",
    "/api/v2/concurrency_limits/decrement-with-lease",
    "/api/v2/concurrency_limits/leases/0b8a6c1e-5c36-4a8e-9b1c-2f7d2f4e9a10/renew",
    "/api/v2/concurrency_limits/db",
    "/api/v2/concurrency_limits/not-implemented/anywhere",  # never the upstream's limits
    "/api/concurrency_limits/",
    "/api/concurrency_limits/filter",
    "/api/concurrency_limits/tag/db/reset",
    "/api/concurrency_limits/increment",
    "/api/slotkeeper/session",
    "/api/live/limits",
    "/api/docs",
    "/api/openapi.json",
    "/metrics",
    "/dashboard",
    "/dashboard/app.js",
    "/",
    "/apix/flows",
]


@pytest.mark.parametrize("path", UPSTREAM)
def test_the_upstreams_paths_are_forwarded(path: str) -> None:
    assert forwarded(path)
    assert not answered_here(path)


@pytest.mark.parametrize("path", HERE)
def test_slotkeepers_paths_are_answered_here(path: str) -> None:
    assert answered_here(path)
    assert not forwarded(path)


def _app_paths() -> set[str]:
    app = create_app(Settings())
    return set(app.openapi()["paths"])


#: slotkeeper's own routes that gateway mode leaves to the upstream, and why.
SHADOWED = {
    "/api/admin/version": "the client checks the version of the Prefect server it talks to",
    "/api/events": "the upstream holds every event (slot events arrive through the outbox)",
    "/api/events/filter": "same",
    "/api/events/filter/next": "same",
    "/api/events/count-by/{countable}": "same",
}


def test_every_route_of_slotkeeper_is_answered_here_or_deliberately_left_to_the_upstream() -> None:
    """A new route of slotkeeper's app must be classified on purpose: answered here, or in
    SHADOWED with the reason."""
    for path in _app_paths():
        concrete = path.replace("{countable}", "event")
        concrete = concrete.replace("{id_or_name}", "db").replace("{limit_id}", "1").replace("{tag}", "t")
        concrete = concrete.replace("{lease_id}", "0b8a6c1e-5c36-4a8e-9b1c-2f7d2f4e9a10")
        if path in SHADOWED:
            assert forwarded(concrete), path
        else:
            assert answered_here(concrete), f"{path}: slotkeeper's route would be forwarded"


def test_upstream_path_puts_the_upstreams_base_in_place_of_api() -> None:
    assert upstream_path("/api/flows/", "/api") == "/api/flows/"
    assert upstream_path("/api/flows/", "/prefect/api/") == "/prefect/api/flows/"
    assert upstream_path("/api", "") == ""
    with pytest.raises(ValueError, match="not under"):
        upstream_path("/metrics", "/api")
