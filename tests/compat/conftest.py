"""Compatibility harness: Prefect's own client (in its own virtualenv) against a real server.

* ``prefect_python``: the interpreter of ``<repo>/.venv-prefect`` with ``prefect==3.8.8``,
  created on first use (CI machines start without it). Prefect is never installed into the
  project's ``.venv``: it is not a dependency of slotkeeper.
* ``server``: a real ``slotkeeper server start`` process per test module, on SQLite in a
  temporary ``SLOTKEEPER_HOME``, stopped at the end of the module.
* ``run_prefect(script, env_extra)``: runs a Python script in the Prefect virtualenv, pointed at
  that server, and returns the finished process. ``start_prefect`` starts one to talk to it while
  it runs. Every script gets :data:`PRELUDE` first (HTTP and result helpers); scripts record
  their observations with ``check``/``acheck`` and print them with ``finish()``, and tests read
  them back with :func:`results`.

Importing Prefect costs seconds, so each script groups many checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.conftest import ServerProcess, basic_auth, clean_env

REPO = Path(__file__).parents[2]
PREFECT_VENV = REPO / ".venv-prefect"
PREFECT_PYTHON = PREFECT_VENV / "bin" / "python"
PREFECT_REQUIREMENTS = ("prefect==3.8.8", "fastapi==0.149.0")
WANTED_VERSIONS = " ".join(r.replace("==", "=") for r in PREFECT_REQUIREMENTS)  # as probed below

#: Prepended to every script run in the Prefect virtualenv.
PRELUDE = '''
import asyncio, base64, json, os, sys, time, traceback, uuid

import httpx

API = os.environ["PREFECT_API_URL"]
_AUTH = os.environ.get("PREFECT_API_AUTH_STRING")
HEADERS = {"Authorization": "Basic " + base64.b64encode(_AUTH.encode()).decode()} if _AUTH else {}
RESULTS = {}


def http(method, path, body=None):
    """A plain HTTP call to the server (not through Prefect): (status, JSON body or None)."""
    response = httpx.request(method, API + path, json=body, headers=HEADERS, timeout=10)
    return response.status_code, (response.json() if response.content else None)


def slots(name):
    """The active slots of a limit, as the server reports them."""
    status, body = http("GET", f"/v2/concurrency_limits/{name}")
    assert status == 200, (status, body)
    return body["active_slots"]


def say(**fields):
    """One JSON line on stdout, for a test following the script while it runs."""
    print(json.dumps(fields, default=str), flush=True)


def _failure(exc):
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "mro": [cls.__name__ for cls in type(exc).__mro__],
    }


def check(key, fn):
    """Record fn()'s value, or the exception it raised, under key."""
    try:
        RESULTS[key] = {"value": fn()}
    except Exception as exc:
        RESULTS[key] = _failure(exc)
        traceback.print_exc()


async def acheck(key, fn):
    """Record the value of await fn(), or the exception it raised, under key."""
    try:
        RESULTS[key] = {"value": await fn()}
    except Exception as exc:
        RESULTS[key] = _failure(exc)
        traceback.print_exc()


def finish():
    print("RESULTS " + json.dumps(RESULTS, default=str), flush=True)
'''


# --- output while capturing -----------------------------------------------------------------------


def announce(config: pytest.Config, message: str) -> None:
    """Print past pytest's capture (the venv setup must be visible in CI logs)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print(f"\n[compat] {message}", flush=True)


# --- the Prefect virtualenv -----------------------------------------------------------------------


def _installed_versions(python: Path) -> str | None:
    """``prefect=X fastapi=Y`` as installed for ``python``, or None when it cannot tell."""
    if not python.exists():
        return None
    probe = (
        "import importlib.metadata as m\n"
        "print(' '.join(f'{p}={m.version(p)}' for p in ('prefect', 'fastapi')))"
    )
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _install_prefect(config: pytest.Config) -> str | None:
    """Create or complete the Prefect virtualenv; the reason it failed, or None."""
    capman = config.pluginmanager.getplugin("capturemanager")
    steps: list[list[str]] = []
    if not PREFECT_PYTHON.exists():
        steps.append([sys.executable, "-m", "venv", str(PREFECT_VENV)])
    steps.append(
        [
            str(PREFECT_PYTHON),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            *PREFECT_REQUIREMENTS,
        ]
    )
    for step in steps:
        announce(config, "running: " + " ".join(step))
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            try:
                done = subprocess.run(step, timeout=1200)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{' '.join(step)} failed: {exc}"
        if done.returncode != 0:
            return f"{' '.join(step)} exited with {done.returncode}"
    return None


def _ensure_prefect(config: pytest.Config) -> str | None:
    """Make the Prefect virtualenv hold ``prefect==3.8.8`` (installing it if needed); the reason
    it cannot, or None."""
    if _installed_versions(PREFECT_PYTHON) == WANTED_VERSIONS:
        return None
    # Two sessions must not build the same virtualenv at once: lock the checkout's folder.
    fd = os.open(REPO, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = _installed_versions(PREFECT_PYTHON)
        if found == WANTED_VERSIONS:
            return None
        announce(
            config,
            f"{PREFECT_VENV} has {found or 'no usable Prefect'}; installing "
            + " ".join(PREFECT_REQUIREMENTS),
        )
        problem = _install_prefect(config)
        found = _installed_versions(PREFECT_PYTHON)
        if problem is None and found != WANTED_VERSIONS:
            problem = f"after install, {PREFECT_VENV} has {found}, not {WANTED_VERSIONS}"
        if problem is None:
            announce(config, f"{PREFECT_VENV} is ready ({found})")
        return problem
    finally:
        os.close(fd)


_SETUP_PROBLEM: dict[str, str | None] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install Prefect before the first test that needs it, not inside it: the install (minutes on
    a fresh machine) must not count against that test's per-test timeout."""
    if any("prefect_python" in getattr(item, "fixturenames", ()) for item in session.items):
        _SETUP_PROBLEM["problem"] = _ensure_prefect(session.config)


@pytest.fixture(scope="session")
def prefect_python(pytestconfig: pytest.Config) -> Path:
    """The Prefect virtualenv's interpreter, installing ``prefect==3.8.8`` there if needed.

    A failed install fails the run in CI (``CI`` set) and skips the compat tests elsewhere.
    """
    problem = _SETUP_PROBLEM["problem"] if "problem" in _SETUP_PROBLEM else _ensure_prefect(pytestconfig)
    if problem is not None:
        reason = f"cannot set up Prefect's client in {PREFECT_VENV}: {problem}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return PREFECT_PYTHON


# --- the slotkeeper server ------------------------------------------------------------------------


class Server(ServerProcess):
    """A ``slotkeeper server start`` process on SQLite under ``home``; ``restart()`` keeps its port.

    ``settings`` are extra ``SLOTKEEPER_*`` environment variables; ``http`` is an HTTP client on
    its API with the auth Prefect's client sends.
    """

    def __init__(self, home: Path, auth: str | None = None, settings: dict[str, str] | None = None) -> None:
        if auth is not None:
            settings = {**(settings or {}), "SLOTKEEPER_API_AUTH_STRING": auth}
        super().__init__(home, **(settings or {}))
        # As Prefect's client: ``Basic base64(<auth string>)``, whatever the string holds.
        headers = {"Authorization": basic_auth(auth)} if auth else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def events(self, event_filter: dict[str, Any], limit: int = 50) -> list[dict[str, Any]]:
        """Every stored event matching ``event_filter`` (following ``next_page``), oldest first."""
        return read_events(self.http, event_filter, limit)


def read_events(http: httpx.Client, event_filter: dict[str, Any], limit: int = 50) -> list[dict[str, Any]]:
    """Every event matching ``event_filter`` that the API behind ``http`` (its ``base_url`` ends
    in ``/api``) serves, following ``next_page``, oldest first: slotkeeper's or Prefect's."""
    answer = http.post("/events/filter", json={"filter": {"order": "ASC", **event_filter}, "limit": limit})
    assert answer.status_code == 200, answer.text
    page = answer.json()
    found: list[dict[str, Any]] = list(page["events"])
    while page["next_page"]:
        answer = http.get(page["next_page"])
        assert answer.status_code == 200, answer.text
        page = answer.json()
        found.extend(page["events"])
    return found


@contextlib.contextmanager
def running_server(
    home: Path, auth: str | None = None, settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """A real server process on SQLite under ``home``, until the block ends."""
    server = Server(home, auth, settings)
    try:
        with server:
            yield server
    finally:
        server.http.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per test module, with an empty database."""
    with running_server(tmp_path_factory.mktemp("slotkeeper-home")) as running:
        yield running


# --- running Prefect scripts ----------------------------------------------------------------------


def _prefect_env(server: Server, prefect_home: Path, env_extra: dict[str, str] | None) -> dict[str, str]:
    env = clean_env(
        ("PREFECT_", "SLOTKEEPER_"),
        PREFECT_API_URL=server.url,  # with the /api prefix, as PREFECT_API_URL wants
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if server.auth is not None:
        env["PREFECT_API_AUTH_STRING"] = server.auth
    env.update(env_extra or {})
    return env


def _script_file(directory: Path, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"script-{time.monotonic_ns()}.py"
    path.write_text(PRELUDE + "\n# --- the test's script ---\n" + textwrap.dedent(script))
    return path


def _server_errors(server: Server) -> list[str]:
    """Lines of the server's log that show a bug (a 500) or a crash."""
    markers = ("Traceback", "unhandled error", "Internal Server Error")
    return [line for line in server.log_text().splitlines() if any(m in line for m in markers)]


def _text(stream: str | bytes | None) -> str:
    """Output kept by ``TimeoutExpired`` (bytes even in text mode)."""
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


class RunPrefect(Protocol):
    def __call__(
        self,
        script: str,
        env_extra: dict[str, str] | None = None,
        *,
        server: Server | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]: ...


class StartPrefect(Protocol):
    def __call__(
        self, script: str, env_extra: dict[str, str] | None = None, *, server: Server | None = None
    ) -> LiveScript: ...


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def run_prefect(prefect_python: Path, server: Server, prefect_home: Path) -> RunPrefect:
    """Run a script with Prefect's client against ``server``; fails on a non-zero exit.

    The server's log must stay free of tracebacks and 500s while it runs.
    """
    module_server = server

    def run(
        script: str,
        env_extra: dict[str, str] | None = None,
        *,
        server: Server | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        target = server or module_server
        path = _script_file(prefect_home / "scripts", script)
        env = _prefect_env(target, prefect_home, env_extra)
        errors_before = len(_server_errors(target))
        try:
            done = subprocess.run(
                [str(prefect_python), str(path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=prefect_home,
            )
        except subprocess.TimeoutExpired as exc:
            out, err = (_text(stream) for stream in (exc.stdout, exc.stderr))
            pytest.fail(f"{path.name} ran over {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
        assert done.returncode == 0, (
            f"{path.name} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        new_errors = _server_errors(target)[errors_before:]
        assert not new_errors, f"the server logged errors:\n{target.log_text()}"
        return done

    return run


class LiveScript:
    """A Prefect script still running: read its JSON lines as they come, write to its stdin."""

    def __init__(self, process: subprocess.Popen[str], name: str) -> None:
        self.process = process
        self.name = name
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    def output(self) -> str:
        return "".join(self.seen) + "\nstderr:\n" + "".join(self._stderr)

    def expect(self, step: str, timeout: float = 60) -> dict[str, Any]:
        """The next JSON line printed with ``say(step=...)``; other lines are kept, not matched."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"{self.name} printed no {step!r} within {timeout} s:\n{self.output()}")
            if line is None:
                self.process.wait()
                pytest.fail(f"{self.name} ended before {step!r}:\n{self.output()}")
            self.seen.append(line)
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and message.get("step") == step:
                    return message

    def send(self, line: str = "go") -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60) -> str:
        """Wait for the end (exit code 0 required); everything it printed."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.name} ran over {timeout} s:\n{self.output()}")
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        assert self.process.returncode == 0, (
            f"{self.name} exited with {self.process.returncode}:\n{self.output()}"
        )
        return "".join(self.seen)

    def kill(self) -> None:
        """Kill it and whatever it started (it leads its own process group: a served flow's run)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def start_prefect(prefect_python: Path, server: Server, prefect_home: Path) -> Iterator[StartPrefect]:
    """Start a script with Prefect's client, to follow it while it runs (killed at the end)."""
    module_server = server
    started: list[LiveScript] = []

    def start(
        script: str, env_extra: dict[str, str] | None = None, *, server: Server | None = None
    ) -> LiveScript:
        path = _script_file(prefect_home / "scripts", script)
        process = subprocess.Popen(
            [str(prefect_python), str(path)],
            env=_prefect_env(server or module_server, prefect_home, env_extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=prefect_home,
            start_new_session=True,  # its own process group, for kill()
        )
        live = LiveScript(process, path.name)
        started.append(live)
        return live

    yield start
    for live in started:
        live.kill()
        for stream in (live.process.stdin, live.process.stdout, live.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --- reading results ------------------------------------------------------------------------------


def results(done: subprocess.CompletedProcess[str] | str) -> dict[str, dict[str, Any]]:
    """What the script recorded with ``check``/``acheck`` (printed by ``finish()``)."""
    stdout = done if isinstance(done, str) else done.stdout
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULTS "):
            found: dict[str, dict[str, Any]] = json.loads(line.removeprefix("RESULTS "))
            return found
    stderr = "" if isinstance(done, str) else done.stderr
    raise AssertionError(f"the script printed no results:\n{stdout}\n{stderr}")


def value(found: dict[str, dict[str, Any]], key: str) -> Any:
    """The value recorded under ``key``; fails with the exception if the check raised."""
    entry = found[key]
    assert "value" in entry, f"{key} raised {entry.get('error')}: {entry.get('message')}"
    return entry["value"]


def error(found: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """The exception recorded under ``key`` (``error``, ``message``, ``mro``); fails if none."""
    entry = found[key]
    assert "error" in entry, f"{key} did not raise; it returned {entry.get('value')!r}"
    return entry


def wait_for(condition: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {timeout} s: {condition}")
        time.sleep(interval)
