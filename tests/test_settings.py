"""Settings: environment variables, bounds, and that every one is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from slotkeeper.settings import Settings

DOCS = Path(__file__).parent.parent / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    missing = [
        f"SLOTKEEPER_{name.upper()}"
        for name in Settings.model_fields
        if f"`SLOTKEEPER_{name.upper()}`" not in text
    ]
    assert missing == []


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLOTKEEPER_HOME", str(tmp_path))
    monkeypatch.setenv("SLOTKEEPER_PORT", "4321")
    monkeypatch.setenv("SLOTKEEPER_LEASE_MIN_SECONDS", "5")
    settings = Settings()
    assert settings.port == 4321
    assert settings.lease_min_seconds == 5
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'slotkeeper.db'}"


def test_defaults_bind_loopback_with_prefect_lease_bounds() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert (settings.lease_min_seconds, settings.lease_max_seconds) == (60, 86400)


def test_lease_bounds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="lease_min_seconds"):
        Settings(lease_min_seconds=100, lease_max_seconds=50)
