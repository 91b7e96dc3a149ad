"""The in-process CLI fixtures the command tests share (see in_process.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.cli.in_process import Run
from tray_app.cli.main import main
from tray_app.storage.database import Database


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def lmgate(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    for name in [n for n in os.environ if n.startswith("LMGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LMGATE_SECRETS_FILE_DIR", str(tmp_path / "secrets"))
    flags = ["--config", str(tmp_path / "none.toml"), "--data-dir", str(data)]

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        # The common flags go after the subcommand's own words, as a person types them.
        code = main([*args, *flags, "--secret-store", "file"])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def db(data: Path) -> Iterator[Callable[[], Database]]:
    opened: list[Database] = []

    def open_db() -> Database:
        opened.append(Database.in_directory(data))
        return opened[-1]

    yield open_db
    for database in opened:
        database.close()
