"""The tray watches what it depends on (issue 15, point 7): LM Studio going away or coming back
while the gateway runs shows within seconds in the status line, the icon and the main window,
and is logged once per change; a missing keyring is said at start and in Settings, with the
fix, and Save says it instead of "set LMGATE_SECRET_…"; a new LM Studio token (from Settings,
or from `lmgate secret set` while the tray runs) reaches the running gateway. The real
controller, gateway and fake LM Studio; Qt offscreen."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import keyring.backends.fail
import pytest

pytest.importorskip("PySide6")

from aiohttp import web
from pytestqt.qtbot import QtBot

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import FakeLMStudio
from tray_app.config.settings import Config
from tray_app.control.controller import Controller, Phase, ThreadedController
from tray_app.control.loop_thread import LoopThread
from tray_app.errors import SecretStoreError
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.secret_store.keyring_store import open_secret_store
from tray_app.ui.actions import AppActions
from tray_app.ui.bridge import UiBridge
from tray_app.ui.settings_dialog import SettingsDialog
from tray_app.ui.tray import MainWindow, icon_name_for, tooltip_for

WATCH = 0.05  # seconds between looks at LM Studio in these tests
NEW_TOKEN = "sk-lm-new-" + "x" * 24


class SwitchableLMStudio:
    """The fake LM Studio on its own loop thread, which can stop listening and come back on
    the same port, as LM Studio's server does when it is stopped and started."""

    def __init__(self) -> None:
        self.thread = LoopThread("fake-lmstudio")
        self.thread.start()
        self.fake = FakeLMStudio()
        self.thread.submit(self.fake.start()).result(5)

    @property
    def url(self) -> str:
        return self.fake.url

    def _runner(self) -> web.AppRunner:
        runner = self.fake._runner
        assert runner is not None
        return runner

    def go_away(self) -> None:
        async def stop_listening() -> None:
            for site in list(self._runner().sites):
                await site.stop()

        self.thread.submit(stop_listening()).result(5)

    def come_back(self) -> None:
        async def listen_again() -> None:
            await web.TCPSite(self._runner(), "127.0.0.1", self.fake.port).start()

        self.thread.submit(listen_again()).result(5)

    def models_asked(self) -> int:
        return self.fake.paths.count("/v1/models")

    def close(self) -> None:
        self.thread.submit(self.fake.stop()).result(5)
        self.thread.stop()


@pytest.fixture
def lmstudio() -> Iterator[SwitchableLMStudio]:
    switchable = SwitchableLMStudio()
    yield switchable
    switchable.close()


Make = Callable[..., ThreadedController]


@pytest.fixture
def make(tmp_path: Path, lmstudio: SwitchableLMStudio) -> Iterator[Make]:
    made: list[ThreadedController] = []

    def build(*, store: object = "memory", **settings: object) -> ThreadedController:
        settings.setdefault("upstream_url", lmstudio.url)
        settings.setdefault("server_port", 0)
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("storage_data_dir", str(tmp_path / "data"))
        chosen = (
            MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}) if store == "memory" else None
        )
        controller = ThreadedController(
            Controller(
                Config(**settings),  # type: ignore[arg-type]
                config_path=tmp_path / "config.toml",
                store=chosen,
                environ={},
                # What Save reloads the file under: these hold again after it.
                overrides={
                    "server.port": 0,
                    "upstream.url": settings["upstream_url"],
                    "storage.data_dir": settings["storage_data_dir"],
                },
                watch_interval=WATCH,
            )
        )
        made.append(controller)
        return controller

    yield build
    for controller in made:
        controller.shutdown()


def _records(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(1 for r in caplog.records if words in r.getMessage())


def test_lmstudio_going_away_and_back_while_public_shows_and_is_logged_once(
    qtbot: QtBot, make: Make, lmstudio: SwitchableLMStudio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmgate.controller")
    controller = make(tunnel_provider="lan", tunnel_lan_address="127.0.0.2")
    bridge = UiBridge()
    controller.add_listener(bridge.publish_state)
    actions = AppActions(controller, bridge, lambda: None)
    window = MainWindow(actions)
    qtbot.addWidget(window)
    controller.start().result(20)
    controller.go_public().result(20)
    qtbot.waitUntil(lambda: actions.state.phase == Phase.PUBLIC, timeout=5000)
    assert actions.state.upstream_note is None
    assert icon_name_for(actions.state) == Phase.PUBLIC

    with qtbot.waitSignal(actions.notify, timeout=5000) as said:
        lmstudio.go_away()
    assert said.args == [
        "LM Studio",
        "LM Studio is not answering: start its server (Developer → Start Server)",
    ]
    qtbot.waitUntil(lambda: "LM Studio is not answering" in window.status.text(), timeout=5000)
    state = actions.state
    assert state.phase == Phase.PUBLIC, "the tunnel is fine: only LM Studio is away"
    assert state.lmstudio_reachable is False
    assert state.status_line.startswith(f"Public at {state.public_url} — LM Studio is not")
    assert "LM Studio is not answering" in tooltip_for(state)
    assert icon_name_for(state) == Phase.RECONNECTING, "the amber icon: up, but not answering"

    asked = lmstudio.models_asked()
    with qtbot.waitSignal(actions.notify, timeout=5000) as said:
        lmstudio.come_back()
    assert said.args == ["LM Studio answers again", ""]
    qtbot.waitUntil(lambda: "not answering" not in window.status.text(), timeout=5000)
    assert actions.state.lmstudio_reachable is True
    assert icon_name_for(actions.state) == Phase.PUBLIC
    # Many more looks at LM Studio: still one log line per change, not one per look.
    qtbot.waitUntil(lambda: lmstudio.models_asked() >= asked + 5, timeout=5000)
    assert _records(caplog, "LM Studio is not answering") == 1
    assert _records(caplog, "LM Studio answers again") == 1
    window.close()


def test_lmstudio_off_at_start_is_said_at_once_and_its_return_seen(
    make: Make, lmstudio: SwitchableLMStudio, qtbot: QtBot
) -> None:
    lmstudio.go_away()
    controller = make()
    state = controller.start().result(20)
    assert state.phase == Phase.PRIVATE and state.needs_lmstudio
    assert controller.state.upstream_note is not None
    assert "not answering" in controller.state.status_line
    lmstudio.come_back()
    qtbot.waitUntil(lambda: controller.state.upstream_note is None, timeout=5000)
    assert controller.state.lmstudio_reachable is True
    assert not controller.state.needs_lmstudio


def _ask_models(controller: ThreadedController) -> int:
    base, key = controller.openai_settings().result(10)
    request = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        json.loads(response.read())
        return int(response.status)


def _last_token(lmstudio: SwitchableLMStudio) -> str | None:
    return lmstudio.fake.received[-1].headers.get("Authorization")


def test_a_token_saved_in_settings_reaches_the_running_gateway(
    make: Make, lmstudio: SwitchableLMStudio
) -> None:
    controller = make()
    controller.start().result(20)
    assert _ask_models(controller) == 200
    assert _last_token(lmstudio) == f"Bearer {LMSTUDIO_TOKEN}"
    lmstudio.fake.behaviour.require_token = NEW_TOKEN  # "Require Authentication", new token
    settings = controller.settings().result(10)
    controller.save_settings(replace(settings, new_lmstudio_token=NEW_TOKEN)).result(30)
    assert controller.state.upstream_note is None
    assert _ask_models(controller) == 200
    assert _last_token(lmstudio) == f"Bearer {NEW_TOKEN}"


def test_a_token_set_from_the_cli_reaches_the_running_gateway(
    make: Make, lmstudio: SwitchableLMStudio, tmp_path: Path, qtbot: QtBot
) -> None:
    secrets_dir = tmp_path / "secrets"
    tray_store = open_secret_store("file", file_dir=secrets_dir)
    tray_store.set(LMSTUDIO_API_TOKEN, LMSTUDIO_TOKEN)
    controller = make(store=None, secrets_store="file", secrets_file_dir=str(secrets_dir))
    controller.start().result(20)
    assert _ask_models(controller) == 200
    # What `lmgate secret set lmstudio-api-token` does from another process: its own store
    # on the same files. Then LM Studio is told to want the new token.
    open_secret_store("file", file_dir=secrets_dir).set(LMSTUDIO_API_TOKEN, NEW_TOKEN)
    lmstudio.fake.behaviour.require_token = NEW_TOKEN
    qtbot.waitUntil(
        lambda: controller.state.message.startswith("LM Studio's new API token is in use"),
        timeout=10000,
    )
    assert controller.state.upstream_note is None
    assert _ask_models(controller) == 200
    assert _last_token(lmstudio) == f"Bearer {NEW_TOKEN}"


def test_a_wrong_token_is_said_and_not_restarted_over(
    make: Make, lmstudio: SwitchableLMStudio, qtbot: QtBot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmgate.controller")
    controller = make()
    controller.start().result(20)
    lmstudio.fake.behaviour.require_token = NEW_TOKEN  # the store still has the old one
    qtbot.waitUntil(lambda: controller.state.upstream_note is not None, timeout=5000)
    assert controller.state.upstream_note == "LM Studio wants an API token: enter it in Settings"
    asked = lmstudio.models_asked()
    qtbot.waitUntil(lambda: lmstudio.models_asked() >= asked + 5, timeout=5000)
    assert _records(caplog, "restarting to use it") == 0
    assert _records(caplog, "LM Studio wants an API token") == 1


@pytest.fixture
def no_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A desktop without a Secret Service: keyring finds only its fail backend."""
    failing = keyring.backends.fail.Keyring()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(keyring, "get_keyring", lambda: failing)


def test_a_missing_keyring_is_said_at_start_and_in_settings_with_the_fix(
    qtbot: QtBot, make: Make, no_keyring: None, tmp_path: Path
) -> None:
    controller = make(store=None, secrets_store="keyring")
    state = controller.start().result(20)
    problem = state.store_problem
    assert problem is not None and state.warning == problem
    assert "No OS keyring is available" in problem
    assert "gnome-keyring" in problem
    assert f'`secrets.store = "file"` in {tmp_path / "config.toml"}' in problem
    assert "unencrypted" in problem and str(tmp_path / "data" / "secrets") in problem

    bridge = UiBridge()
    dialog = SettingsDialog(controller, bridge)
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.store_note.text() == problem, timeout=5000)
    assert not dialog.store_note.isHidden()
    dialog.lmstudio_token.setText(NEW_TOKEN)
    dialog.save_button.click()
    qtbot.waitUntil(lambda: dialog.status.text().startswith("The token was not saved."))
    assert "LMGATE_SECRET_" not in dialog.status.text()
    assert 'secrets.store = "file"' in dialog.status.text()
    assert not (tmp_path / "config.toml").exists(), "nothing was half saved"
    with pytest.raises(SecretStoreError, match="The token was not saved"):
        settings = controller.settings().result(10)
        controller.save_settings(replace(settings, new_ngrok_token="2ab" + "c" * 40)).result(10)
    dialog.close()
