"""The tray UI with a controller double, offscreen (pytest-qt): menu actions, state-driven icon
and tooltip, clipboard, the QR window decoded with zxing-cpp, settings, devices, first run."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("PySide6")

import zxingcpp
from PIL import Image
from PySide6.QtGui import QGuiApplication, QImage
from PySide6.QtWidgets import QSystemTrayIcon, QWidget

from tests.fake_controller import PUBLIC_URL, FakeController
from tray_app.control.controller import Phase
from tray_app.ui.actions import AppActions
from tray_app.ui.app import TrayApp, send_to_running
from tray_app.ui.bridge import UiBridge
from tray_app.ui.qr import MAX_PAYLOAD
from tray_app.ui.tray import Tray, TrayMenu, tooltip_for


def decode(widget_or_image: QWidget | QImage) -> list[str]:
    image = (
        widget_or_image if isinstance(widget_or_image, QImage) else widget_or_image.grab().toImage()
    )
    image = image.convertToFormat(QImage.Format.Format_RGB888)
    pil = Image.frombytes(
        "RGB",
        (image.width(), image.height()),
        bytes(image.constBits()),
        "raw",
        "RGB",
        image.bytesPerLine(),
    )
    return [result.text for result in zxingcpp.read_barcodes(pil)]


def chatbox_config(link: str) -> dict[str, Any]:
    """The provider config in a Chatbox deep link, ``chatbox://provider/import?config=…``
    (chatboxai/chatbox-docs, en/guides/providers/import-config.md): base64 of JSON."""
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path) == ("chatbox", "provider", "/import")
    query = parse_qs(parts.query, strict_parsing=True)
    assert list(query) == ["config"] and len(query["config"]) == 1
    config: dict[str, Any] = json.loads(base64.b64decode(query["config"][0], validate=True))
    assert set(config) == {"id", "name", "type", "iconUrl", "urls", "settings"}
    assert config["name"] == "LM Gate"
    assert config["urls"] == {"website": config["settings"]["apiHost"]}
    return config


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def actions(qtbot, fake: FakeController) -> AppActions:  # type: ignore[no-untyped-def]
    bridge = UiBridge()
    fake.add_listener(bridge.publish_state)
    quits: list[bool] = []
    created = AppActions(fake, bridge, lambda: quits.append(True))
    created.quits = quits  # type: ignore[attr-defined]
    return created


def publish(qtbot, fake: FakeController, actions: AppActions, **changes) -> None:  # type: ignore[no-untyped-def]
    with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
        fake.publish(**changes)


def trigger(qtbot, menu: TrayMenu, text: str) -> None:  # type: ignore[no-untyped-def]
    menu.rebuild()
    action = menu.action(text)
    assert action.isEnabled(), text
    action.trigger()
    qtbot.wait(50)  # futures' results come back through the bridge's queued signal


def test_menu_when_private(actions: AppActions) -> None:
    menu = TrayMenu(actions)
    assert menu.texts == [
        "Private: only this computer can connect",
        "Go public",
        "Show QR code…",
        "Copy public URL",
        "Copy curl snippet",
        "Copy OpenAI settings",
        "Devices & tokens…",
        "Warm up a model…",
        "Settings…",
        "Open logs folder",
        "Quit",
    ]
    assert not menu.action("Show QR code…").isEnabled()
    assert not menu.action("Copy public URL").isEnabled()
    assert menu.action("Go public").isEnabled()


def test_menu_is_rebuilt_from_the_state_each_time_it_opens(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    menu = TrayMenu(actions)
    publish(qtbot, fake, actions, phase=Phase.PUBLIC, public_url=PUBLIC_URL)
    menu.menu.aboutToShow.emit()
    assert menu.texts[0] == f"Public at {PUBLIC_URL}"
    assert "Go private" in menu.texts and "Go private and revoke all devices" in menu.texts
    assert "Go public" not in menu.texts
    assert menu.action("Show QR code…").isEnabled()
    publish(qtbot, fake, actions, phase=Phase.RECONNECTING, message="Reconnecting (attempt 2)")
    menu.menu.aboutToShow.emit()
    assert menu.texts[0] == "Reconnecting (attempt 2)"
    assert not menu.action("Show QR code…").isEnabled()


def test_go_public_and_private_and_the_kill_switch(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    menu = TrayMenu(actions)
    trigger(qtbot, menu, "Go public")
    assert fake.called("go_public") == [()]
    assert actions.state.phase == Phase.PUBLIC
    trigger(qtbot, menu, "Go private")
    assert fake.called("go_private") == [(False,)]
    trigger(qtbot, menu, "Go public")
    trigger(qtbot, menu, "Go private and revoke all devices")
    assert fake.called("go_private")[-1] == (True,)


def test_copy_actions_fill_the_clipboard(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    menu = TrayMenu(actions)
    clipboard = QGuiApplication.clipboard()
    trigger(qtbot, menu, "Go public")
    trigger(qtbot, menu, "Copy public URL")
    assert clipboard.text() == PUBLIC_URL
    trigger(qtbot, menu, "Copy curl snippet")
    assert clipboard.text().startswith("curl -N ")
    trigger(qtbot, menu, "Copy OpenAI settings")
    assert clipboard.text() == f"OPENAI_BASE_URL={PUBLIC_URL}/v1\nOPENAI_API_KEY=lmg_fake_app_key\n"


def test_windows_open_non_modal(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    menu = TrayMenu(actions)
    trigger(qtbot, menu, "Settings…")
    assert actions.settings_window is not None and actions.settings_window.isVisible()
    assert not actions.settings_window.isModal()
    trigger(qtbot, menu, "Devices & tokens…")
    window = actions.devices_window
    assert window is not None and window.isVisible()
    assert window.table.rowCount() == 2
    assert window.table.item(0, 1).text() == "Pixel"
    assert window.table.item(0, 4).text() == "12"
    for w in (actions.settings_window, window):
        w.close()


def test_open_logs_folder_and_quit(qtbot, fake, actions, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("tray_app.ui.actions.log_dir", lambda: tmp_path / "logs")
    menu = TrayMenu(actions)
    trigger(qtbot, menu, "Open logs folder")
    assert (tmp_path / "logs").is_dir()
    trigger(qtbot, menu, "Quit")
    assert actions.quits == [True]


def test_tray_icon_and_tooltip_follow_the_state(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    tray = Tray(actions)
    keys = {}
    for phase, changes in (
        (Phase.PRIVATE, {}),
        (Phase.STARTING, {"message": "Going public…"}),
        (Phase.PUBLIC, {"public_url": PUBLIC_URL}),
        (Phase.RECONNECTING, {"message": "Reconnecting (attempt 1)"}),
        (Phase.ERROR, {"message": "ngrok needs an account"}),
    ):
        publish(qtbot, fake, actions, phase=phase, **changes)
        assert tray.phase == phase
        assert tray.icon.toolTip() == tooltip_for(actions.state)
        assert phase in tray.icon.toolTip()
        keys[phase] = tray.icon.icon().pixmap(16, 16).toImage()
    assert len({bytes(img.constBits()) for img in keys.values()}) == 5, (
        "every state has its own icon at 16 px"
    )
    assert PUBLIC_URL in tooltip_for(fake.publish(phase=Phase.PUBLIC, public_url=PUBLIC_URL))


def test_notifications_on_state_changes(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    with qtbot.waitSignal(actions.notify, timeout=2000) as signal:
        fake.publish(phase=Phase.PUBLIC, public_url=PUBLIC_URL)
    assert signal.args == ["LM Gate is public", PUBLIC_URL]
    with qtbot.waitSignal(actions.notify, timeout=2000) as signal:
        fake.publish(phase=Phase.RECONNECTING, message="lost")
    assert signal.args[0] == "LM Gate is reconnecting"


def test_without_a_tray_a_window_offers_the_same_actions(qtbot, fake) -> None:  # type: ignore[no-untyped-def]
    assert not QSystemTrayIcon.isSystemTrayAvailable()  # offscreen has none, like bare GNOME
    app = TrayApp(fake, instance=f"lmgate-test-{id(fake)}")
    try:
        app.start()
        qtbot.waitUntil(lambda: app.window.isVisible())
        labels = [b.text().replace("&&", "&") for b in app.window.buttons]
        assert labels[:2] == ["Go public", "Show QR code…"]
        assert "Quit" in labels and "Copy curl snippet" in labels
        next(b for b in app.window.buttons if b.text() == "Go public").click()
        qtbot.waitUntil(lambda: fake.state.phase == Phase.PUBLIC)
        qtbot.waitUntil(lambda: "Go private" in [b.text() for b in app.window.buttons])
    finally:
        app.quit()
    assert ("shutdown", ()) in fake.calls


def test_a_second_launch_reaches_the_first(qtbot, fake) -> None:  # type: ignore[no-untyped-def]
    name = f"lmgate-test-second-{id(fake)}"
    app = TrayApp(fake, instance=name)
    try:
        app.start()
        app.window.hide()
        assert send_to_running(["show"], name)
        qtbot.waitUntil(lambda: app.window.isVisible())
        assert send_to_running(["go-public"], name)
        qtbot.waitUntil(lambda: fake.state.phase == Phase.PUBLIC)
        fake.go_private()
        assert send_to_running(["show-qr"], name)
        qtbot.waitUntil(
            lambda: app.actions.qr_window is not None and app.actions.qr_window.isVisible(),
            timeout=3000,
        )
        assert fake.state.phase == Phase.PUBLIC
    finally:
        app.quit()
    assert not send_to_running(["show"], name), "after quit nobody listens"


def test_first_run_guide_instead_of_an_error(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    publish(qtbot, fake, actions, needs_tunnel=True, needs_lmstudio=True)
    assert actions.guide.isVisible()
    text = actions.guide.text.text()
    assert "Start Server" in text and "Going public" in text
    qtbot.waitUntil(lambda: "LAN" in actions.guide.choices.text())
    assert "ngrok" in actions.guide.choices.text()
    actions.guide.hide()
    menu = TrayMenu(actions)
    trigger(qtbot, menu, "Go public")
    assert fake.called("go_public") == [], "no error: the guide explains what to do"
    assert actions.guide.isVisible()
    actions.guide.hide()


# ---- the QR window -------------------------------------------------------------------------


def test_qr_window_shows_a_scannable_pairing_link(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    fake.go_public()
    qtbot.wait(50)
    actions.show_qr()
    window = actions.qr_window
    assert window is not None
    qtbot.waitUntil(lambda: window.link is not None)
    window.resize(420, 560)
    qtbot.wait(50)
    link = window.link
    assert link is not None
    assert link.url == f"{PUBLIC_URL}/#{link.code}" and len(link.url) <= MAX_PAYLOAD
    assert decode(window) == [link.url]
    assert window.url_field.text() == link.url
    assert window.countdown.text().startswith("Expires in 9:5")
    window.close()


def test_qr_code_renews_itself_when_it_expires(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    from tray_app.ui.qr_window import QrWindow

    now = [1_000_000.0]
    fake.clock = lambda: now[0]
    fake.go_public()
    window = QrWindow(fake, actions.bridge, clock=lambda: now[0])
    window.show()
    qtbot.waitUntil(lambda: window.link is not None)
    first = window.link
    assert first is not None
    now[0] = first.expires_at + 1
    window._tick()
    qtbot.waitUntil(lambda: window.link is not None and window.link.code != first.code)
    assert len(fake.called("pairing_link")) == 2
    window.close()


def test_for_apps_tab_shows_base_url_and_key(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    fake.go_public()
    actions.show_qr()
    window = actions.qr_window
    assert window is not None
    window.tabs.setCurrentIndex(1)
    qtbot.waitUntil(lambda: window.chatbox_field.text() != "")
    assert window.base_url_field.text() == PUBLIC_URL + "/v1"
    assert window.key_field.text() == "lmg_fake_app_key"
    window.resize(460, 900)
    qtbot.wait(50)
    assert decode(window) == [], "the code holds the key: drawn only when asked"
    window.show_apps_qr.click()
    (decoded,) = decode(window)
    # What a phone app imports, not a JSON blob no app reads: Chatbox's provider link.
    assert decoded == window.chatbox_field.text()
    config = chatbox_config(decoded)
    assert config["settings"] == {
        "apiHost": PUBLIC_URL,
        "apiPath": "/v1/chat/completions",
        "apiKey": "lmg_fake_app_key",
        "models": [{"modelId": "qwen2.5-7b-instruct"}, {"modelId": "llama-3.2-1b"}],
    }
    assert config["id"] == "calm-otter-42.ngrok-free.app" and config["type"] == "openai"
    assert "with 2 models" in window.apps_hint.text()
    assert len(fake.called("openai_settings")) == 1, "one key per window, not per view"
    window.close()


# ---- settings --------------------------------------------------------------------------------


def test_settings_test_connection_and_save(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    actions.show_settings()
    dialog = actions.settings_window
    assert dialog is not None
    qtbot.waitUntil(lambda: dialog.upstream.text() == "http://127.0.0.1:1234")
    assert dialog.ngrok_token.text() == "" and "stored" in dialog.ngrok_token.placeholderText()
    dialog.test_button.click()
    qtbot.waitUntil(lambda: "Connected" in dialog.test_result.text())
    assert dialog.models.count() == 2
    dialog.models.item(0).setCheckState(dialog.models.item(0).checkState().Checked)
    dialog.provider.setCurrentIndex(dialog.provider.findData("lan"))
    dialog.token_ttl.setText("7d")
    dialog.rpm.setValue(30)
    dialog.lmstudio_token.setText("sk-lm-new")
    dialog.save_button.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "Saved.")
    (saved,) = fake.called("save_settings")
    new = saved[0]
    assert new.tunnel_provider == "lan" and new.auth_token_ttl == 7 * 86400
    assert new.auth_allowed_models == ("qwen2.5-7b-instruct",)
    assert new.limits_requests_per_minute == 30 and new.new_lmstudio_token == "sk-lm-new"
    assert new.new_ngrok_token is None, "an untouched secret field changes nothing"
    assert dialog.lmstudio_token.text() == "", "secret fields never show a value"
    dialog.token_ttl.setText("soon")
    dialog.save_button.click()
    assert "lifetime" in dialog.status.text()
    dialog.close()


def test_devices_window_revokes_and_creates(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    actions.show_devices()
    window = actions.devices_window
    assert window is not None
    qtbot.waitUntil(lambda: window.table.rowCount() == 2)
    window.table.selectRow(0)
    window.revoke_button.click()
    assert window.confirm_row.isVisible() and fake.called("revoke") == [], "asks first"
    window.confirm_button.click()
    qtbot.waitUntil(lambda: fake.called("revoke") == [("device", "d1")])
    window.new_name.setText("ci job")
    window.create_button.click()
    qtbot.waitUntil(lambda: window.new_key.text() == "lmg_new_key_for_ci_job")
    assert "not shown again" in window.status.text()
    window.close()


def test_none_refcount_does_not_fall_over_many_void_calls(qtbot) -> None:  # type: ignore[no-untyped-def]
    # PySide6 6.12.0 on Python 3.11 drops a reference to None per void call and later dies
    # with "Fatal Python error: none_dealloc"; the pin in pyproject.toml keeps 6.11 there.
    widget = QWidget()
    before = sys.getrefcount(None)
    for i in range(20_000):
        widget.setToolTip("x" if i % 2 else "y")  # returns None: a void call
    after = sys.getrefcount(None)
    assert after >= before - 100, (before, after)
