"""The quickstart scripts' install step (``scripts/_venv.sh``): pip runs on a fresh machine and
when ``pyproject.toml`` changed, not on every start. pip is replaced by a script that records
its calls, in a virtualenv of the test's own."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_runs_only_when_something_changed(tmp_path: Path) -> None:
    venv, calls = tmp_path / "venv", tmp_path / "pip-calls"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"  # "pip install" here installs the console script
    python.write_text(
        f'#!/bin/sh\necho "$@" >> "{calls}"\ntouch "{venv}/bin/slotkeeper"\nchmod +x "{venv}/bin/slotkeeper"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IEXEC)

    def ensure(extras: str = "") -> int:
        env = {**os.environ, "SLOTKEEPER_VENV": str(venv), "PYTHON": sys.executable}
        subprocess.run(
            ["bash", "-c", f'source "{ROOT}/scripts/_venv.sh" && ensure_venv {extras}'], env=env, check=True
        )
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    assert ensure() == 1  # a fresh machine
    assert calls.read_text().split() == [
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-e",
        str(ROOT),
    ]
    assert ensure() == 1  # nothing changed: no pip
    assert ensure("test") == 2  # the extras were never installed
    assert calls.read_text().splitlines()[-1].endswith(f"-e {ROOT}[test]")
    assert (ensure("test"), ensure()) == (2, 2)  # the extras include the base
    (venv / ".slotkeeper-installed-test").write_text("the hash of an older pyproject.toml\n")
    assert ensure("test") == 3
    (venv / "bin" / "slotkeeper").unlink()  # a virtualenv without slotkeeper in it
    assert ensure() == 4
