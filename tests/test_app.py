"""The app's lifetime: what a server process does once at start-up."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from slotkeeper.api.app import create_app
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # give the frozen objects back to the collector: the suite goes on


async def test_a_server_freezes_its_start_up_objects(unfrozen: None, tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite"))
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 0


async def test_an_app_around_a_given_storage_does_not(
    unfrozen: None, storage: Storage, tmp_path: Path
) -> None:
    app = create_app(Settings(home=tmp_path), storage=storage)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() == 0
