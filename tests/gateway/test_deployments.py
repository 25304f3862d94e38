"""A deployment served by ``flow.serve()`` through the gateway runs a flow run created through it.

The serving process and the script that calls ``run_deployment`` both have Prefect's client
pointed at the gateway: the deployment is registered, its scheduled run polled for, the run
started in a subprocess of the server process, its states set and read, all forwarded to Prefect's
server, while the flow's tagged task takes its slot from slotkeeper.
"""

from __future__ import annotations

import uuid

import pytest

from tests.compat.conftest import RunPrefect, Server, StartPrefect, results, value
from tests.gateway.conftest import PrefectServer, own_slot_events

pytestmark = pytest.mark.slow

SERVE_SCRIPT = """
from prefect import flow, task

@task(tags=[os.environ["TAG"]])
def double(x):
    return 2 * x


@flow(name=os.environ["FLOW"])
def served(x: int):
    return double(x)


if __name__ == "__main__":  # the run's process loads this file for the flow: it must not serve
    served.serve(name=os.environ["DEPLOYMENT"])
"""

RUN_SCRIPT = """
from prefect import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

NAME = os.environ["FLOW"] + "/" + os.environ["DEPLOYMENT"]


def deployment():
    # flow.serve() registers it once its process has imported Prefect: wait for it (bounded).
    deadline = time.monotonic() + 90
    with get_client(sync_client=True) as client:
        while True:
            try:
                return str(client.read_deployment_by_name(NAME).id)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def run():
    flow_run = run_deployment(NAME, parameters={"x": 21}, timeout=120, poll_interval=1)
    return {"id": str(flow_run.id), "state": flow_run.state.type.value}


check("deployment", deployment)
if "value" in RESULTS["deployment"]:
    check("run", run)
finish()
"""


def test_a_served_deployment_runs_a_flow_run_created_through_the_gateway(
    gateway: Server, upstream: PrefectServer, start_prefect: StartPrefect, run_prefect: RunPrefect
) -> None:
    tag = f"served-{uuid.uuid4().hex[:8]}"
    answer = gateway.http.post("/concurrency_limits/", json={"tag": tag, "concurrency_limit": 1})
    assert answer.status_code == 201, answer.text
    env = {
        "TAG": tag,
        "FLOW": f"gateway-served-{uuid.uuid4().hex[:8]}",
        "DEPLOYMENT": "through-the-gateway",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # 10 s by default
    }
    serving = start_prefect(SERVE_SCRIPT, env)
    try:
        found = results(run_prefect(RUN_SCRIPT, env, timeout=240))
    finally:
        serving.kill()
    assert value(found, "deployment")
    run = value(found, "run")
    assert run["state"] == "COMPLETED", (run, serving.output())

    # Prefect's server has the run, and its task run, as the served process reported them.
    flow_run = upstream.http.get(f"/flow_runs/{run['id']}").json()
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["deployment_id"] == value(found, "deployment")
    task_runs = upstream.http.post(
        "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}
    ).json()
    assert [t["tags"] for t in task_runs] == [[tag]]

    # The run's tagged task took its slot from slotkeeper (Prefect's server never saw the lease).
    limit_id = gateway.http.get(f"/v2/concurrency_limits/tag:{tag}").json()["id"]
    own = own_slot_events(gateway, f"prefect.concurrency-limit.{limit_id}")
    assert sorted(e.event for e in own) == [
        "prefect.concurrency-limit.acquired",
        "prefect.concurrency-limit.released",
    ]
    holder = {
        "prefect.resource.id": f"prefect.task-run.{task_runs[0]['id']}",
        "prefect.resource.role": "task-run",
    }
    for event in own:
        assert holder in event.related, event
