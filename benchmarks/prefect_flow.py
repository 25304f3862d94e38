"""Prefect's own flow with tagged tasks on a tag limit: run by ``gateway.py`` in ``.venv-prefect``.

Usage (``PREFECT_API_URL`` names the server: Prefect's own, or slotkeeper's gateway before it)::

    .venv-prefect/bin/python benchmarks/prefect_flow.py --tag TAG [--limit 4] [--tasks 50]
        [--hold 0.1] [--timeout 300]

Creates the tag limit with Prefect's client (``create_concurrency_limit``; an existing one is
kept), then runs one flow whose ``tasks`` tasks are all tagged ``tag``, submitted at once to a
thread pool as large as the flow (so every task asks for its slot at once); each holds its slot
``hold`` seconds. Prefect's task engine takes a lease on ``tag:<tag>`` for each task and, when
the server answers 423 (limit full), sleeps its ``Retry-After`` and asks again. Reported, as one
JSON line on stdout: the flow's wall time (from the flow call to its return, Prefect's import and
the limit's creation excluded), its final state, every HTTP status the process received (counted
at httpx, so the 423s are every refusal the engine met; a 503 is a server's retryable error, such
as Prefect's SQLite being locked, which Prefect's client retries after a backoff), the most task
bodies inside at once (never more than the limit), and the first error.

It imports nothing from the harness: ``.venv-prefect`` has Prefect but not slotkeeper.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import threading
import time
from typing import Any

import httpx

STATUSES: collections.Counter[int] = collections.Counter()
_STATUS_LOCK = threading.Lock()


def _count_statuses() -> None:
    """Count the status of every response any httpx client of this process receives."""
    async_send = httpx.AsyncClient.send
    sync_send = httpx.Client.send

    async def counted_async_send(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> httpx.Response:
        response = await async_send(self, *args, **kwargs)
        with _STATUS_LOCK:
            STATUSES[response.status_code] += 1
        return response

    def counted_sync_send(self: httpx.Client, *args: Any, **kwargs: Any) -> httpx.Response:
        response = sync_send(self, *args, **kwargs)
        with _STATUS_LOCK:
            STATUSES[response.status_code] += 1
        return response

    httpx.AsyncClient.send = counted_async_send  # type: ignore[method-assign]
    httpx.Client.send = counted_sync_send  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--hold", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    _count_statuses()
    from prefect import flow, get_client, task
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.task_runners import ThreadPoolTaskRunner

    inside = 0
    most_inside = 0
    lock = threading.Lock()

    @task(tags=[args.tag])
    def hold(i: int) -> int:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        try:
            time.sleep(args.hold)
        finally:
            with lock:
                inside -= 1
        return i

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=args.tasks), timeout_seconds=args.timeout)
    def tagged() -> int:
        futures = [hold.submit(i) for i in range(args.tasks)]
        return sum(f.result() for f in futures)

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_concurrency_limit(tag=args.tag, concurrency_limit=args.limit)

    before = STATUSES.copy()
    error = None
    began = time.perf_counter()
    try:
        state = tagged(return_state=True)
        state_name = state.type.value
        if not state.is_completed():
            error = str(state.message)[:300]
    except Exception as exc:
        state_name = "RAISED"
        error = repr(exc)[:300]
    wall = time.perf_counter() - began
    statuses = STATUSES - before
    print(
        json.dumps(
            {
                "tag": args.tag,
                "limit": args.limit,
                "tasks": args.tasks,
                "hold_s": args.hold,
                "wall_s": wall,
                "state": state_name,
                "statuses": {str(code): n for code, n in sorted(statuses.items())},
                "refused_423": statuses.get(423, 0),
                "unavailable_503": statuses.get(503, 0),
                "most_inside": most_inside,
                "error": error,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
