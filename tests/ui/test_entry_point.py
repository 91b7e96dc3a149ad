"""The entry point builds the core and hands it to the UI; a second launch builds nothing."""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6")

from PySide6.QtNetwork import QLocalServer

import tray_app.control.desktop as desktop
import tray_app.ui.app as ui_app
from tray_app import main as entry_point
from tray_app.cli.main import TrayLaunch
from tray_app.control.controller import ThreadedController
from tray_app.errors import ConfigError


@pytest.fixture
def restore_lmgate_logging() -> Iterator[None]:
    root = logging.getLogger("lmgate")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level, root.propagate = saved


@pytest.mark.parametrize("flags", [False, True], ids=["plain", "with-flags"])
def test_a_second_launch_hands_its_wish_over_and_builds_no_core(
    qtbot: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: bool,
) -> None:
    name = f"lmgate-entry-{time.time_ns()}"
    monkeypatch.setattr(ui_app, "instance_name", lambda: name)
    running = QLocalServer()
    assert running.listen(name)
    received: list[bytes] = []

    def take() -> None:
        connection = running.nextPendingConnection()
        connection.waitForReadyRead(2000)
        received.append(bytes(connection.readAll().data()))

    running.newConnection.connect(take)

    def no_core() -> ThreadedController:
        raise AssertionError("a second launch must not open the first one's database")

    monkeypatch.setattr(desktop, "desktop_controller", no_core)
    try:
        overrides: dict[str, object] = {"server.port": "9123"} if flags else {}
        assert entry_point.run_tray(TrayLaunch(["show-qr"], overrides=overrides)) == 0
        qtbot.waitUntil(lambda: received == [b"show-qr\n"], timeout=3000)
    finally:
        running.close()
    err = capsys.readouterr().err
    assert "LM Gate already runs for this user" in err
    # Flags cannot reach the running tray: never silently dropped.
    assert ("--port did not reach it" in err) == flags


def test_the_desktop_core_is_built_from_the_config_and_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_lmgate_logging: None
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[upstream]\nurl = 'http://127.0.0.1:4321'\n")
    monkeypatch.setenv("LMGATE_CONFIG", str(config))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    threaded = desktop.desktop_controller()
    assert threaded.controller.config.upstream_url == "http://127.0.0.1:4321"
    assert threaded.state.gateway_url is None, "nothing runs until the tray starts it"
    logging.getLogger("lmgate.test").warning("to the file")
    logs = list((tmp_path / "state").rglob(desktop.LOG_FILE))
    assert logs and '"to the file"' in logs[0].read_text()


def test_a_broken_config_is_a_config_error_before_any_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_lmgate_logging: None
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[server]\nport = 'x'\n")
    monkeypatch.setenv("LMGATE_CONFIG", str(config))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with pytest.raises(ConfigError, match=r"server\.port"):
        desktop.desktop_controller()


def test_flags_and_a_config_path_build_the_desktop_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_lmgate_logging: None
) -> None:
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text("[upstream]\nurl = 'http://127.0.0.1:4321'\n")
    monkeypatch.setenv("LMGATE_CONFIG", str(tmp_path / "not-this.toml"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    threaded = desktop.desktop_controller(overrides={"server.port": "9123"}, config_path=elsewhere)
    controller = threaded.controller
    assert controller.config.upstream_url == "http://127.0.0.1:4321"
    assert controller.config.server_port == 9123
    assert controller._config_path == elsewhere  # where Settings saves


# ---- the tray's log is private ---------------------------------------------------------------
# It records errors, client addresses, principals and the public URL: another user on this
# machine (position C in docs/security.md) must not read it, whatever the umask.


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the common default: 0755 directories, 0644 files
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "state" / "lmgate" / "log"
    monkeypatch.setattr(desktop, "user_log_dir", lambda: directory)
    return directory


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
class TestTheLogIsPrivate:
    def test_a_new_log_directory_and_file_are_0700_and_0600(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        restore_lmgate_logging: None,
        loose_umask: None,
    ) -> None:
        directory = _log_dir(tmp_path, monkeypatch)
        desktop.configure_file_logging()
        logging.getLogger("lmgate.test").warning("from 203.0.113.7 as key:abc")
        log = directory / desktop.LOG_FILE
        assert "203.0.113.7" in log.read_text()
        assert _mode(log) == 0o600
        assert _mode(directory) == 0o700
        assert _mode(directory.parent) == 0o700, "the parents it made too"

    def test_an_existing_loose_log_is_tightened(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        restore_lmgate_logging: None,
        loose_umask: None,
    ) -> None:
        directory = _log_dir(tmp_path, monkeypatch)
        directory.mkdir(parents=True, mode=0o755)
        old = [directory / desktop.LOG_FILE, directory / f"{desktop.LOG_FILE}.1"]
        for path in old:
            path.write_text("written by an older version\n")
            path.chmod(0o644)
        directory.chmod(0o755)
        desktop.configure_file_logging()
        assert _mode(directory) == 0o700
        assert [_mode(path) for path in old] == [0o600, 0o600]
        assert old[0].read_text().startswith("written by an older version"), "appended to"

    def test_the_file_after_a_rollover_is_0600(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        restore_lmgate_logging: None,
        loose_umask: None,
    ) -> None:
        directory = _log_dir(tmp_path, monkeypatch)
        desktop.configure_file_logging()
        (handler,) = logging.getLogger("lmgate").handlers
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        logging.getLogger("lmgate.test").warning("before the rollover")
        handler.doRollover()
        logging.getLogger("lmgate.test").warning("after the rollover")
        fresh, rolled = directory / desktop.LOG_FILE, directory / f"{desktop.LOG_FILE}.1"
        assert "after the rollover" in fresh.read_text()
        assert "before the rollover" in rolled.read_text()
        assert [_mode(fresh), _mode(rolled)] == [0o600, 0o600]


def test_a_first_launch_hands_its_flags_and_config_to_the_desktop_core(
    qtbot: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ui_app, "instance_name", lambda: f"lmgate-first-{time.time_ns()}")
    built: list[dict[str, object]] = []
    ran: list[tuple[list[str], object]] = []
    core = object()

    def capture_core(**kwargs: object) -> object:
        built.append(kwargs)
        return core

    monkeypatch.setattr(desktop, "desktop_controller", capture_core)

    def capture_run(wishes: list[str], controller: object) -> int:
        ran.append((wishes, controller))
        return 0

    monkeypatch.setattr(ui_app, "run", capture_run)
    # The collector is settled before the tray runs (a stand-in here: the real one would
    # freeze this test process's objects for the rest of the session).
    settled: list[dict[str, object]] = []
    monkeypatch.setattr(entry_point, "settle_after_start", lambda **kw: settled.append(kw))
    launch = TrayLaunch(["go-public"], tmp_path / "c.toml", {"server.port": "9123"})
    assert entry_point.run_tray(launch) == 0
    assert built == [{"overrides": {"server.port": "9123"}, "config_path": tmp_path / "c.toml"}]
    assert ran == [(["go-public"], core)]
    assert settled == [{"rarer_young_collections": False}]
