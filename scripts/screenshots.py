"""Photograph the dashboard for docs/ (run by ``scripts/screenshots``; see docs/dashboard.md).

Starts ``slotkeeper server start`` on a fresh SQLite database in a temporary folder, creates a
few limits over HTTP, runs workers that acquire (waiting in the queue), hold and release for a
while so that the chart has something to show, then opens the pages in headless Chromium and
saves ``docs/dashboard-overview.png`` and ``docs/dashboard-limit.png``.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
V2 = "/api/v2/concurrency_limits"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Api:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


def worker(api: Api, name: str, stop: threading.Event, hold: tuple[float, float]) -> None:
    """Acquire (waiting in the queue), hold a while, release; until told to stop."""
    holder = {"type": "task_run", "id": str(uuid.uuid4())}
    while not stop.is_set():
        try:
            status, answer = api.call(
                "POST", f"{V2}/increment-with-lease",
                {"names": [name], "slots": 1, "lease_duration": 120, "wait_seconds": 60, "holder": holder},
            )
            if status != 200:
                continue
            time.sleep(random.uniform(*hold))
            api.call("POST", f"{V2}/decrement-with-lease", {"lease_id": answer["lease_id"]})
        except OSError:  # the server is stopping
            return


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("slotkeeper")), "server", "start", "--port", str(port),
             "--log-level", "warning"],
            env={"SLOTKEEPER_HOME": home, "PATH": "/usr/bin:/bin"},
        )
        base = f"http://127.0.0.1:{port}"
        api = Api(base)
        try:
            for _ in range(200):
                try:
                    if api.call("GET", "/api/health")[1] is True:
                        break
                except OSError:
                    time.sleep(0.1)
            limits = [
                ("db-connections", 8, 0.0, True),
                ("warehouse", 2, 0.0, True),
                ("openai-api", 60, 1.0, True),
                ("s3-uploads", 20, 0.0, True),
                ("payments-legacy", 3, 0.0, False),
                ("reports", 1, 0.0, True),
                ("tag:etl", 4, 0.0, True),
            ]
            for name, limit, decay, active in limits:
                api.call("POST", f"{V2}/", {"name": name, "limit": limit, "slot_decay_per_second": decay,
                                            "active": active})
            for _ in range(5):
                api.call("POST", f"{V2}/increment-with-lease", {
                    "names": ["db-connections"], "slots": 1, "lease_duration": 600,
                    "holder": {"type": "flow_run", "id": str(uuid.uuid4())}})
            api.call("POST", f"{V2}/increment-with-lease", {"names": ["s3-uploads"], "slots": 6, "lease_duration": 900})
            api.call("POST", f"{V2}/increment-with-lease", {"names": ["reports"], "slots": 1, "lease_duration": 3600})
            api.call("POST", "/api/concurrency_limits/increment",
                     {"names": ["etl"], "task_run_id": str(uuid.uuid4())})
            stop = threading.Event()
            workers = [threading.Thread(target=worker, args=(api, "warehouse", stop, (0.5, 3.0)), daemon=True)
                       for _ in range(5)]
            workers += [threading.Thread(target=worker, args=(api, "reports", stop, (5.0, 10.0)), daemon=True)
                        for _ in range(2)]
            for thread in workers:
                thread.start()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                api.call("POST", f"{V2}/increment", {"names": ["openai-api"], "slots": 7, "mode": "rate_limit"})
                time.sleep(5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 620}, device_scale_factor=1)
                page.goto(f"{base}/dashboard")
                expect(page.locator('tr[data-limit="warehouse"]')).to_be_visible()
                page.wait_for_timeout(1500)
                page.screenshot(path=str(DOCS / "dashboard-overview.png"))
                page.set_viewport_size({"width": 1400, "height": 1000})
                page.goto(f"{base}/dashboard#/limits/warehouse")
                expect(page.locator("#holders tr[data-lease]").first).to_be_visible()
                expect(page.locator("#queue tr[data-waiter]").first).to_be_visible()
                page.wait_for_timeout(2000)
                page.screenshot(path=str(DOCS / "dashboard-limit.png"), full_page=True)
                browser.close()
            stop.set()
            print(f"wrote {DOCS / 'dashboard-overview.png'} and {DOCS / 'dashboard-limit.png'}")
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
