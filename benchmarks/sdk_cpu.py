"""The SDK's client CPU per block: an uncontended ``with concurrency(...)`` (acquire and release).

What it measures: ``time.process_time()`` (every thread of the client process: the caller's and
the SDK's) over ``--blocks`` blocks after 50 to warm up, for the ``with`` form and the ``async
with`` form, each in a fresh process per round; the server (slotkeeper on SQLite, started here in
a scratch home, or ``--url``) runs in its own process and is not counted. It prints the median of
``--rounds`` rounds and the command that made them.

By default the same two requests per block (acquire with a lease, release it) are also measured
with aiohttp (one event loop, no thread), in alternation with the SDK: what the SDK's own client
is compared with. A/B: ``--sources A=path/to/src,B=other/src`` measures each source tree's SDK
(put first on ``sys.path``) in alternation, round after round, against the same server: compare
them within one run (ratios, not absolute times: the machine is shared).

    python benchmarks/sdk_cpu.py [--rounds 7] [--blocks 300] [--url URL] [--sources A=src,B=/tmp/old/src]

``--parsers`` measures only the reading of one answer (a grant, as uvicorn sends it), in this
process: the SDK's own path (:class:`slotkeeper.sdk._wire.Connection` over httptools) against h11,
the pure-Python parser that was the other candidate.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import servers

ROOT = servers.ROOT
LIMIT = "sdk-cpu"

#: Run in a fresh interpreter per round: ``{src}`` first on sys.path, then the measurement.
PROBE = """
import asyncio, sys, time
sys.path.insert(0, {src!r})
from slotkeeper.sdk import aconcurrency, concurrency

URL, N, WARM = {url!r}, {blocks}, 50

for _ in range(WARM):
    with concurrency({limit!r}, api_url=URL):
        pass
cpu = time.process_time()
for _ in range(N):
    with concurrency({limit!r}, api_url=URL):
        pass
sync = (time.process_time() - cpu) / N

async def main() -> float:
    for _ in range(WARM):
        async with aconcurrency({limit!r}, api_url=URL):
            pass
    cpu = time.process_time()
    for _ in range(N):
        async with aconcurrency({limit!r}, api_url=URL):
            pass
    return (time.process_time() - cpu) / N

print(sync * 1e3, asyncio.run(main()) * 1e3)
"""

#: The same two requests per block (acquire with a lease, release it) with aiohttp, on one
#: event loop and no thread: what the SDK's own client is compared with.
AIOHTTP_PROBE = """
import asyncio, json, time
import aiohttp

URL, N, WARM = {url!r}, {blocks}, 50
ACQUIRE = json.dumps({{"names": [{limit!r}], "slots": 1, "lease_duration": 300}}).encode()
HEADERS = {{"Content-Type": "application/json"}}

async def block(http: aiohttp.ClientSession) -> None:
    async with http.post(URL + "/v2/concurrency_limits/increment-with-lease", data=ACQUIRE, headers=HEADERS) as r:
        lease = (await r.json())["lease_id"]
    body = json.dumps({{"lease_id": lease}}).encode()
    async with http.post(URL + "/v2/concurrency_limits/decrement-with-lease", data=body, headers=HEADERS) as r:
        await r.read()

async def main() -> float:
    async with aiohttp.ClientSession() as http:
        for _ in range(WARM):
            await block(http)
        cpu = time.process_time()
        for _ in range(N):
            await block(http)
        return (time.process_time() - cpu) / N

print(asyncio.run(main()) * 1e3)
"""


def measure(src: str, url: str, blocks: int) -> tuple[float, ...]:
    """ms of CPU per block, in a fresh process: (with, async with) with the SDK of ``src``, or
    (pair,) with aiohttp when ``src`` is "aiohttp"."""
    probe = AIOHTTP_PROBE if src == "aiohttp" else PROBE
    code = probe.format(src=src, url=url, blocks=blocks, limit=LIMIT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the measurement of {src} failed:\n{done.stderr}")
    return tuple(float(x) for x in done.stdout.split())


def create_limit(url: str) -> None:
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"name": LIMIT, "limit": 10}).encode()
    request = urllib.request.Request(
        url + "/v2/concurrency_limits/", body, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise


#: A grant as uvicorn answers it.
GRANT = (
    b'{"lease_id":"0b6b2f4e-8c0a-4a55-9b5c-3a8c1c2f8f10","limits":[{"id":"0b6b2f4e-8c0a-4a55-9b5c-'
    b'3a8c1c2f8f11","name":"db","limit":10,"fencing_token":123}]}'
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 16:59:35 GMT\r\nserver: uvicorn\r\n"
    b"content-length: %d\r\ncontent-type: application/json\r\n\r\n" % len(GRANT) + GRANT
)


def parsers(rounds: int, answers: int = 20000) -> None:
    """µs of CPU to read one answer: the SDK's connection (httptools) and h11 (medians)."""
    import h11

    from slotkeeper.sdk import _wire

    def sdk() -> float:
        conn = _wire.Connection()
        cpu = time.process_time()
        for _ in range(answers):
            conn.data_received(ANSWER)
            conn.ready = None
        return (time.process_time() - cpu) / answers

    def with_h11() -> float:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="POST", target="/api/x", headers=[("Host", "x"), ("Content-Length", "0")]
        )
        cpu = time.process_time()
        for _ in range(answers):
            conn.send(request)
            conn.send(h11.EndOfMessage())
            conn.receive_data(ANSWER)
            body = []
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body.append(event.data)
            conn.start_next_cycle()
        return (time.process_time() - cpu) / answers

    timings: dict[str, list[float]] = {"sdk (httptools)": [], "h11": []}
    for _ in range(rounds):
        timings["sdk (httptools)"].append(sdk())
        timings["h11"].append(with_h11())
    print(f"CPU to read one answer ({len(ANSWER)} bytes), median of {rounds} rounds of {answers}:")
    for name, values in timings.items():
        print(f"  {name:>16}: {statistics.median(values) * 1e6:.1f} µs")
    print("command: python benchmarks/sdk_cpu.py --parsers")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=300)
    parser.add_argument("--url", help="a running server's API URL (default: start one on SQLite)")
    parser.add_argument(
        "--sources",
        default=f"sdk={ROOT / 'src'},aiohttp=aiohttp",
        help="NAME=SRC,... measured in alternation (SRC 'aiohttp': the same requests with aiohttp)",
    )
    parser.add_argument("--parsers", action="store_true", help="only the reading of one answer")
    args = parser.parse_args()
    if args.parsers:
        parsers(args.rounds)
        return
    sources = dict(item.split("=", 1) for item in args.sources.split(","))
    started = None
    url = args.url
    if url is None:
        started = servers.start("slotkeeper-sqlite")
        servers.wait_healthy([started], 60)
        url = started.base_url + "/api"
    try:
        create_limit(url)
        results: dict[str, list[tuple[float, ...]]] = {name: [] for name in sources}
        for round_ in range(args.rounds):
            order = list(sources.items())
            if round_ % 2:
                order.reverse()
            for name, src in order:
                path = src if src == "aiohttp" else str(Path(src).resolve())
                results[name].append(measure(path, url, args.blocks))
    finally:
        if started is not None:
            servers.stop_all([started])
    load = os.getloadavg()
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/sdk_cpu.py", *sys.argv[1:]])
    print(f"SDK client CPU per uncontended block (acquire + release), median of {args.rounds} rounds")
    print(f"of {args.blocks} blocks; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {time.ctime()}")
    print("  (median, and in brackets the lowest round: the least disturbed by other processes)")
    for name, rows in results.items():
        if len(rows[0]) == 1:
            pairs = [r[0] for r in rows]
            print(f"  {name:>10}: {statistics.median(pairs):.3f} ms ({min(pairs):.3f}) per acquire + release")
            continue
        sync, asynchronous = ([r[i] for r in rows] for i in (0, 1))
        print(
            f"  {name:>10}: with {statistics.median(sync):.3f} ms ({min(sync):.3f}), "
            f"async with {statistics.median(asynchronous):.3f} ms ({min(asynchronous):.3f})"
        )
    print(f"command: {command}")


if __name__ == "__main__":
    main()
