"""The servers under test: start each on a free loopback port, pause, resume, measure, stop.

Every server runs in its own session (process group), so that the whole group (Prefect may
spawn helpers) can be paused with SIGSTOP while another server is measured, resumed with
SIGCONT, and stopped with SIGTERM then SIGKILL. Each gets a fresh temporary home (and, for
PostgreSQL, a fresh database that is created here and dropped on stop).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOTKEEPER_VENV = ROOT / ".venv"
PREFECT_VENV = ROOT / ".venv-prefect"
PREFECT_PINS = ("prefect==3.8.8", "fastapi==0.149.0")
LOOPBACK = "127.0.0.1"
#: The PostgreSQL server the slotkeeper-postgres variant uses (a database is created per run).
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

SERVER_KEYS = ("slotkeeper-sqlite", "slotkeeper-postgres", "prefect-sqlite", "redis")
#: The reference servers: measured in "pairs" only, with a client of their own (no HTTP).
REFERENCE_KEYS = ("redis",)

#: The Redis reference: a counting semaphore with leases (a sorted set per name, scored by each
#: holder's expiry on Redis's own clock). The script drops the expired holders and adds this one
#: if fewer than the limit hold a place; ``ZREM`` releases. What a user who picks Redis writes.
REDIS_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
"""


class ServerError(RuntimeError):
    """A server could not be started or did not become healthy."""


def free_port() -> int:
    """A TCP port free on the loopback address right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any SLOTKEEPER_/PREFECT_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLOTKEEPER_", "PREFECT_"))}
    if env.get("PYTHONPATH"):
        # Servers run in a home of their own: `PYTHONPATH=src` must still mean this tree's src.
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p
        )
    env.update(extra)
    return env


def prefect_versions(packages: tuple[str, ...]) -> dict[str, str] | None:
    """Python's, SQLite's and these packages' versions in ``.venv-prefect`` ("not installed" for
    a missing package); None when its Python does not run."""
    code = (
        "import importlib.metadata as m, json, platform, sqlite3, sys\n"
        "out = {'python': platform.python_version(), 'sqlite': sqlite3.sqlite_version}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    python = PREFECT_VENV / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=False)
    return dict(json.loads(done.stdout)) if done.returncode == 0 else None


def ensure_prefect_venv(packages: tuple[str, ...] = ()) -> dict[str, str]:
    """Make sure ``.venv-prefect`` has the pinned Prefect (create or fix it if not); the versions
    there of the pinned packages and ``packages`` (see :func:`prefect_versions`)."""
    wanted = {p.split("==")[0]: p.split("==")[1] for p in PREFECT_PINS}
    names = tuple(dict.fromkeys([*wanted, *packages]))
    found = prefect_versions(names)
    if found is not None and all(found.get(n) == v for n, v in wanted.items()):
        return found
    if found is None:
        print(f"[bench] creating {PREFECT_VENV} ({' '.join(PREFECT_PINS)}); this takes a while", flush=True)
        subprocess.run(["python3", "-m", "venv", str(PREFECT_VENV)], check=True)
    else:
        print(f"[bench] {PREFECT_VENV} lacks {' '.join(PREFECT_PINS)}: installing", flush=True)
    subprocess.run(
        [
            str(PREFECT_VENV / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *PREFECT_PINS,
        ],
        check=True,
    )
    return prefect_versions(names) or {"error": f"{PREFECT_VENV} does not run after installing"}


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_reachable() -> str | None:
    """None if the PostgreSQL admin URL is on loopback and answers, else why not."""
    host = urllib.parse.urlsplit(POSTGRES_ADMIN_URL).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        return f"{POSTGRES_ADMIN_URL} is not a loopback address; the benchmarks only target loopback"
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except Exception as exc:
        return f"{POSTGRES_ADMIN_URL} is unreachable: {str(exc).strip().splitlines()[0]}"
    return None


def _admin_sql(statement: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement.encode())  # names in it are generated here, never taken from input


def postgres_version() -> str | None:
    """The PostgreSQL server's version string, or None when unreachable."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
    except Exception:
        return None


# --- running servers --------------------------------------------------------------------------


@dataclass
class Server:
    """One running server process group."""

    key: str
    port: int
    home: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]
    env_shown: dict[str, str]
    database: str | None = None
    paused: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pgid(self) -> int:
        """The process group (= the session leader's pid)."""
        return self.proc.pid

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def pause(self) -> None:
        """Freeze the whole process group (SIGSTOP), so it takes no CPU while others run."""
        if not self.paused and self.proc.poll() is None:
            self._signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """Unfreeze the process group (SIGCONT)."""
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False

    def pids(self) -> list[int]:
        """Every live process of the group."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.pgid:
                found.append(int(entry))
        return found

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        """Ask the group to stop (SIGTERM, then SIGCONT so a paused group sees it)."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)
            self.paused = False

    def kill(self) -> None:
        """Force the group down."""
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _spawn(key: str, command: list[str], env: dict[str, str], home: Path, shown: dict[str, str]) -> Server:
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=str(home),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    port = int(command[command.index("--port") + 1])
    return Server(key, port, home, proc, log_path, command, shown)


def slotkeeper_command(port: int) -> list[str]:
    """The command line that serves slotkeeper on ``port``: ``slotkeeper server start``, as its
    users start it (uvicorn with uvloop, httptools and slotkeeper's own protocol class, which
    sees a lost connection at once; graceful shutdown)."""
    return [
        _slotkeeper_python(),
        "-m",
        "slotkeeper.cli",
        "server",
        "start",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def uvicorn_command(app: str, port: int, *options: str) -> list[str]:
    """The uvicorn command line that serves the ASGI app factory ``app`` on ``port`` (uvloop,
    httptools): for applications other than slotkeeper's own (``nodb_server.py``)."""
    return [
        _slotkeeper_python(),
        "-m",
        "uvicorn",
        app,
        "--factory",
        *options,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def _slotkeeper_python() -> str:
    python = SLOTKEEPER_VENV / "bin" / "python"
    return str(python if python.exists() else Path(sys.executable))


def start_slotkeeper(key: str) -> Server:
    """Start slotkeeper on SQLite (fresh home) or PostgreSQL (fresh database)."""
    home = Path(tempfile.mkdtemp(prefix=f"bench-{key}-"))
    shown = {"SLOTKEEPER_HOME": str(home)}
    database = None
    if key == "slotkeeper-postgres":
        database = f"slotkeeper_bench_{uuid.uuid4().hex[:12]}"
        _admin_sql(f'CREATE DATABASE "{database}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        shown["SLOTKEEPER_DATABASE_URL"] = f"{base}/{database}"
    try:
        server = _spawn(key, slotkeeper_command(free_port()), _clean_env(**shown), home, shown)
    except BaseException:
        if database:
            _admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        raise
    server.database = database
    return server


def postgres_url(database: str) -> str:
    """The URL of ``database`` on the benchmark's PostgreSQL server."""
    return f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{database}"


def create_database() -> str:
    """Create a fresh PostgreSQL database for one server; its name."""
    database = f"slotkeeper_bench_{uuid.uuid4().hex[:12]}"
    _admin_sql(f'CREATE DATABASE "{database}"')
    return database


def drop_database(database: str) -> None:
    """Drop a database made by :func:`create_database` (also while connections are open)."""
    _admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def start_slotkeeper_prepared(
    key: str, home: Path, database: str | None, extra_env: dict[str, str]
) -> Server:
    """Start slotkeeper on a home (SQLite: its ``slotkeeper.db``) or database prepared beforehand,
    with extra settings; :func:`stop_all` drops the database and removes the home afterwards."""
    shown = {"SLOTKEEPER_HOME": str(home), **extra_env}
    if database:
        shown["SLOTKEEPER_DATABASE_URL"] = postgres_url(database)
    server = _spawn(key, slotkeeper_command(free_port()), _clean_env(**shown), home, shown)
    server.database = database
    return server


def start_prefect() -> Server:
    """Start ``prefect server start`` on SQLite in a fresh PREFECT_HOME."""
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    shown = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
    }
    command = [
        str(PREFECT_VENV / "bin" / "prefect"),
        "server",
        "start",
        "--host",
        LOOPBACK,
        "--port",
        str(free_port()),
    ]
    return _spawn("prefect-sqlite", command, _clean_env(**shown), home, shown)


def redis_missing() -> str | None:
    """Why the Redis reference cannot run here (no ``redis-server``, no redis-py), or None."""
    import importlib.util

    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if importlib.util.find_spec("redis") is None:
        return "redis-py is not installed (pip install -e '.[bench]')"
    return None


def start_redis() -> Server:
    """Start ``redis-server`` (no persistence) on a free loopback port (readiness not awaited;
    :func:`redis_missing` tells beforehand whether it can run)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server is not installed")
    home = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    command = [
        binary,
        "--port",
        str(free_port()),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(home),
    ]
    return _spawn("redis", command, _clean_env(), home, {})


def redis_healthy(server: Server, timeout: float = 2.0) -> bool:
    """True if the Redis server answers ``PING`` now."""
    try:
        with socket.create_connection((LOOPBACK, server.port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start(key: str) -> Server:
    """Start the server named ``key`` (one of :data:`SERVER_KEYS`); health is not awaited."""
    if key == "prefect-sqlite":
        return start_prefect()
    if key == "redis":
        return start_redis()
    if key in ("slotkeeper-sqlite", "slotkeeper-postgres"):
        return start_slotkeeper(key)
    raise ValueError(f"unknown server {key!r}; choose from {', '.join(SERVER_KEYS)}")


def healthy(server: Server, timeout: float = 2.0) -> bool:
    """True if ``GET /api/health`` answers 200 now (Redis: ``PING``)."""
    if server.key == "redis":
        return redis_healthy(server, timeout)
    try:
        with urllib.request.urlopen(server.base_url + "/api/health", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def wait_healthy(servers: list[Server], timeout: float) -> None:
    """Wait until every server answers its health check; raise with its log if one dies or times out."""
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.proc.poll() is not None:
                raise ServerError(
                    f"{server.key} exited with code {server.proc.returncode}:\n{server.log_tail()}"
                )
            if healthy(server, timeout=1.0):
                waiting.remove(server)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.key for s in waiting)
            tails = "\n".join(f"--- {s.key}\n{s.log_tail()}" for s in waiting)
            raise ServerError(f"not healthy after {timeout:.0f} s: {names}\n{tails}")
        if waiting:
            time.sleep(0.1)


def stop_all(servers: list[Server], timeout: float = 10.0) -> None:
    """Stop every server (TERM, then KILL after ``timeout``), drop databases, remove homes."""
    for server in servers:
        server.terminate()
    deadline = time.monotonic() + timeout
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Helpers of the group may outlive the leader: make sure none is left.
        server.kill()
    for server in servers:
        if server.database:
            try:
                _admin_sql(f'DROP DATABASE IF EXISTS "{server.database}" WITH (FORCE)')
            except Exception as exc:
                print(f"[bench] could not drop database {server.database}: {exc}", flush=True)
        shutil.rmtree(server.home, ignore_errors=True)


# --- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds consumed so far by these processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    busy = user + nice + system + irq + softirq
    return busy / _TICK, steal / _TICK, total / _TICK
