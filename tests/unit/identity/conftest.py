"""An identity layer on a fresh database with a fake clock, for the identity unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, open_identity

SIGNING_KEY = b"k" * 32

IdentityMaker = Callable[..., Identity]


@pytest.fixture
def make_identity(tmp_path: Path) -> Iterator[IdentityMaker]:
    opened: list[Identity] = []

    def make(**settings: Any) -> Identity:
        config = Config(storage_data_dir=str(tmp_path / f"data{len(opened)}"), **settings)
        identity = open_identity(config, SIGNING_KEY, clock=FakeClock())
        opened.append(identity)
        return identity

    yield make
    for identity in opened:
        identity.close()


@pytest.fixture
def identity(make_identity: IdentityMaker) -> Identity:
    return make_identity()
