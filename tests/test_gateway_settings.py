"""Gateway mode's settings and ``slotkeeper server start --upstream``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
from typer.testing import CliRunner

from slotkeeper import storage
from slotkeeper.api import server as server_module
from slotkeeper.api.app import create_app
from slotkeeper.cli import app
from slotkeeper.settings import Settings


def test_the_upstream_url_is_checked_and_kept_without_its_last_slash() -> None:
    assert Settings().upstream_url is None
    assert Settings(upstream_url="http://prefect:4200/api/").upstream_url == "http://prefect:4200/api"
    assert (
        Settings(upstream_url=" https://p.example/prefect/api ").upstream_url
        == "https://p.example/prefect/api"
    )
    for bad in (
        "prefect:4200/api",
        "ftp://prefect/api",
        "http:///api",
        "http://p/api?x=1",
        "http://p:99999/api",
        "http://[::1/api",
        "http://p q/api",
    ):
        with pytest.raises(pydantic.ValidationError, match="upstream_url"):
            Settings(upstream_url=bad)


def test_without_an_upstream_the_app_has_no_gateway(tmp_path: Path) -> None:
    assert create_app(Settings(home=tmp_path)).state.gateway is None
    assert create_app(Settings(home=tmp_path, upstream_url="http://p:4200/api")).state.gateway is not None


def test_server_start_upstream_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(server_module.Server, "run", lambda self: calls.append(self))
    monkeypatch.setattr(storage, "migrate", lambda url: ("0001", "0001"))
    result = CliRunner().invoke(
        app,
        ["server", "start", "--upstream", "http://user:pw@prefect:4200/api"],
        env={"SLOTKEEPER_HOME": str(tmp_path), "SLOTKEEPER_UPSTREAM_URL": "http://other:1/api"},
    )
    assert result.exit_code == 0, result.output
    assert (
        "Gateway: forwarding what slotkeeper does not answer to http://user:***@prefect:4200/api"
        in result.stdout
    )
    (started,) = calls
    assert started.app.state.settings.upstream_url == "http://user:pw@prefect:4200/api"

    result = CliRunner().invoke(app, ["server", "start", "--upstream", "prefect:4200"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Invalid settings") and "upstream_url" in result.stderr
