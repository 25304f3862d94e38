"""The fuzzer: Schemathesis generates requests from the running server's own OpenAPI document,
on each backend, and checks every answer: never a 5xx, and status, content type, headers and body
as the document says (issue 11).

What it runs, per backend (about 40 s each on a busy 2-core machine):

- every operation, 8 generated requests each (valid and invalid bodies, parameters and
  encodings: a body that is not UTF-8 once made each hot route answer 500);
- the event queries (filter, count-by), 48 each: their filters are deep, and a NUL character in
  one of their strings once made PostgreSQL's driver fail (a 500).

The seed is fixed, so a run repeats the same requests; a failure prints Schemathesis's report
with a ``curl`` command for each failing request. The live views (``/api/live``) stream without
end and are left out. More examples: ``SLOTKEEPER_FUZZ_EXAMPLES=100``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

#: The console script installed beside this Python.
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
#: The checks that say "the server answers what its document says" (not those that judge how
#: strictly it validates: pydantic accepts "5" for 5, as Prefect's server does).
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "allow_header_conformance",
    ]
)
EXAMPLES = int(os.environ.get("SLOTKEEPER_FUZZ_EXAMPLES", "8"))
#: The event queries get more: most generated filters are refused early, and the rest nest deep.
EVENT_QUERIES = ("POST /api/events/filter", "POST /api/events/count-by/{countable}")


def fuzz(server: ServerProcess, workdir: Path, examples: int, *selection: str) -> None:
    """Run Schemathesis against ``server``; fail with its report if any check failed."""
    command = [
        SCHEMATHESIS,
        "run",
        f"{server.url}/openapi.json",
        f"--checks={CHECKS}",
        f"--max-examples={examples}",
        "--phases=fuzzing",
        "--workers=2",
        "--seed=1",
        "--no-color",
        *selection,
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}\n{server.log_text()}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_fuzzer_finds_nothing(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    settings = {}
    if backend == "postgres":
        settings["SLOTKEEPER_DATABASE_URL"] = request.getfixturevalue("private_postgres_url")
    with ServerProcess(tmp_path / "home", **settings) as server:
        fuzz(server, tmp_path, EXAMPLES, "--exclude-path-regex=^/api/live")
        fuzz(server, tmp_path, EXAMPLES * 6, *(f"--include-name={name}" for name in EVENT_QUERIES))
