"""No dead ends when the tray starts (issue 15, point 6): a taken port moves the desktop app to
a free loopback port and says so (naming another LM Gate when one answers there), Settings
shows the port, Save keeps what flags and LMGATE_* variables set, a second launch is never a
silent exit, and every red icon is in the log. The real controller, gateway and fake LM Studio;
the Qt parts offscreen with the controller double."""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_controller import FakeController
from tests.fake_lmstudio import FakeLMStudio
from tray_app.config.settings import Config, load_config
from tray_app.control.controller import (
    Controller,
    Phase,
    ThreadedController,
    config_path_for,
)
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore

Make = Callable[..., ThreadedController]


@pytest.fixture
def make(tmp_path: Path, lmstudio_thread: FakeLMStudio) -> Iterator[Make]:
    made: list[ThreadedController] = []

    def build(
        config: Config | None = None,
        *,
        port_fallback: bool = True,
        overrides: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
        name: str = "a",
        **settings: object,
    ) -> ThreadedController:
        settings.setdefault("upstream_url", lmstudio_thread.url)
        settings.setdefault("server_port", 0)
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("storage_data_dir", str(tmp_path / name / "data"))
        controller = ThreadedController(
            Controller(
                config or Config(**settings),  # type: ignore[arg-type]
                config_path=tmp_path / name / "config.toml",
                store=MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
                overrides=overrides,
                environ=environ if environ is not None else {},
                port_fallback=port_fallback,
            )
        )
        made.append(controller)
        return controller

    yield build
    for controller in made:
        controller.shutdown()


def _port(url: str | None) -> int:
    assert url is not None
    return int(url.rsplit(":", 1)[1])


def _healthz(url: str) -> int:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
        return int(response.status)


def test_a_taken_port_moves_the_tray_to_a_free_one_and_says_so(make: Make) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        controller = make(server_port=taken)
        state = controller.start().result(20)
        assert state.phase == Phase.PRIVATE, state.message
        used = _port(state.gateway_url)
        assert used != taken
        assert state.port_note == (
            f"Port {taken} is taken by another program; LM Gate uses port {used} instead."
        )
        assert _healthz(state.gateway_url or "") == 200, "the gateway really runs there"
        settings = controller.settings().result(5)
        assert (settings.configured_port, settings.port_in_use) == (taken, used)
        assert settings.port_note == state.port_note


def test_another_lmgate_on_the_port_is_named(make: Make) -> None:
    first = make(name="first")
    taken = _port(first.start().result(20).gateway_url)
    second = make(name="second", server_port=taken)
    state = second.start().result(20)
    assert state.phase == Phase.PRIVATE
    used = _port(state.gateway_url)
    assert used != taken
    assert state.port_note is not None
    assert state.port_note.startswith(f"Another LM Gate already runs at 127.0.0.1:{taken}")
    assert f"this one uses port {used}" in state.port_note


def test_without_the_fallback_a_taken_port_stays_an_error_in_the_log(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # `serve`-like strictness stays available; the tray's red icon is never silent in the log.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        controller = make(server_port=holder.getsockname()[1], port_fallback=False)
        with caplog.at_level(logging.ERROR, logger="lmgate.controller"):
            state = controller.start().result(20)
    assert state.phase == Phase.ERROR and state.port_note is None
    logged = [r.getMessage() for r in caplog.records if r.name == "lmgate.controller"]
    assert logged == [f"LM Gate shows an error: {state.message}"]


def test_saving_settings_keeps_flag_and_environment_overrides(
    make: Make, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    path = tmp_path / "a" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("[limits]\nrequests_per_minute = 50\n", encoding="utf-8")
    environ = {"LMGATE_LIMITS_REQUESTS_PER_MINUTE": "7"}
    overrides = {
        "upstream.url": lmstudio_thread.url,
        "server.port": 0,
        "storage.data_dir": str(tmp_path / "a" / "data"),
    }
    config = load_config(path=path, environ=environ, overrides=overrides)
    controller = make(config, overrides=overrides, environ=environ)
    controller.start().result(20)
    settings = controller.settings().result(5)
    assert dict(settings.overridden) == {
        "upstream.url": "command line",
        "limits.requests_per_minute": "LMGATE_LIMITS_REQUESTS_PER_MINUTE",
    }
    assert settings.limits_requests_per_minute == 7
    new = replace(settings, tunnel_provider="lan", limits_concurrent_requests=3)
    state = controller.save_settings(new).result(30)
    assert state.phase == Phase.PRIVATE, state.message
    now = controller.controller.config
    assert now.upstream_url == lmstudio_thread.url, "the flag still holds after Save"
    assert now.limits_requests_per_minute == 7, "the variable still holds after Save"
    assert (now.tunnel_provider, now.limits_concurrent_requests) == ("lan", 3)
    from_file = load_config(path=path, environ={})
    assert from_file.limits_requests_per_minute == 50, "the file keeps its own value"
    assert from_file.upstream_url != lmstudio_thread.url, "a flag is not written to the file"
    assert from_file.tunnel_provider == "lan"


def test_settings_save_where_lmgate_config_points(tmp_path: Path) -> None:
    named = tmp_path / "elsewhere.toml"
    assert config_path_for({"LMGATE_CONFIG": str(named)}) == named
    assert config_path_for({}).name == "config.toml"


# ---- what the person sees (offscreen Qt, controller double) ------------------------------


@pytest.fixture
def qt_actions(qtbot):  # type: ignore[no-untyped-def]
    pytest.importorskip("PySide6")
    from tray_app.ui.actions import AppActions
    from tray_app.ui.bridge import UiBridge

    fake = FakeController()
    bridge = UiBridge()
    fake.add_listener(bridge.publish_state)
    return fake, AppActions(fake, bridge, lambda: None)


def test_the_tray_says_when_it_moved_to_another_port(qtbot, qt_actions) -> None:  # type: ignore[no-untyped-def]
    fake, actions = qt_actions
    note = "Port 8787 is taken by another program; LM Gate uses port 40123 instead."
    with qtbot.waitSignal(actions.notify, timeout=2000) as signal:
        fake.publish(gateway_url="http://127.0.0.1:40123", port_note=note)
    assert signal.args == ["LM Gate uses another port", note]


def test_settings_show_the_port_and_lock_overridden_fields(qtbot, qt_actions) -> None:  # type: ignore[no-untyped-def]
    fake, actions = qt_actions
    note = "Port 8787 is taken by another program; LM Gate uses port 40123 instead."
    fake.stored_settings = replace(
        fake.stored_settings,
        overridden=(("upstream.url", "LMGATE_UPSTREAM_URL"),),
        configured_port=8787,
        port_in_use=40123,
        port_note=note,
    )
    actions.show_settings()
    dialog = actions.settings_window
    qtbot.waitUntil(lambda: dialog.port_info.text() != "")
    assert dialog.port_info.text() == note
    assert not dialog.upstream.isEnabled() and dialog.rpm.isEnabled()
    assert "LMGATE_UPSTREAM_URL" in dialog.upstream.toolTip()
    assert dialog.overrides_note.text() == (
        "Set for this run, not by Settings: LM Studio URL (LMGATE_UPSTREAM_URL)."
    )
    dialog.save_button.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "Saved.")
    (saved,) = fake.called("save_settings")
    assert saved[0].overridden == (("upstream.url", "LMGATE_UPSTREAM_URL"),)
    # A later run without the variable: the field is Settings' again.
    dialog.load(replace(fake.stored_settings, overridden=(), port_in_use=8787, port_note=None))
    assert dialog.upstream.isEnabled()
    assert dialog.port_info.text().startswith("8787 ")
    assert dialog.overrides_note.text() == ""
    dialog.close()


def test_a_second_launch_says_where_lmgate_runs(qtbot, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("PySide6")
    from tray_app.ui import app as ui_app

    fake = FakeController()
    name = f"lmgate-test-second-says-{id(fake)}"
    monkeypatch.setattr(ui_app, "instance_name", lambda: name)
    running = ui_app.TrayApp(fake, instance=name)
    try:
        running.start()
        assert ui_app.hand_to_running(["show-qr"])
        err = capsys.readouterr().err
        assert "LM Gate already runs for this user" in err
        assert "show its QR code" in err
    finally:
        running.quit()
    assert not ui_app.hand_to_running([]), "nobody runs: this launch starts the tray"
    assert capsys.readouterr().err == ""
