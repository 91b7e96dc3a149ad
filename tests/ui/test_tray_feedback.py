"""Feedback in the tray (issue 15, point 8): "Copied" after every copy, "Paired: <device> ✓" and
a fresh code when a phone pairs, one expiring key per purpose instead of a never-expiring key
per click, and a Devices window that shows expiry and whole names, asks before revoking and can
hide revoked rows. Offscreen Qt with the controller double, and the real core where it counts.

Names others choose (a device names itself when it pairs; LM Studio names its models) are shown
as text: a name written as HTML must not draw as markup (issue 15, security review)."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtGui import QColor, QGuiApplication, Qt, QTextDocument
from PySide6.QtWidgets import QLabel, QPushButton, QWidget

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_controller import PUBLIC_URL, FakeController
from tests.fake_lmstudio import FakeLMStudio
from tray_app.config.settings import Config
from tray_app.control.controller import (
    APP_KEY_TTL,
    FOR_APPS,
    MENU_OPENAI_SETTINGS,
    Controller,
    Credential,
    ThreadedController,
)
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.ui.actions import AppActions
from tray_app.ui.bridge import UiBridge
from tray_app.ui.qr_window import QrWindow
from tray_app.ui.settings_dialog import SettingsDialog
from tray_app.ui.tray import MainWindow, TrayMenu


class PairingFake(FakeController):
    """The double, plus devices that pair while a window watches."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[Credential] = []

    def credentials(self) -> concurrent.futures.Future[list[Credential]]:
        rows = super().credentials().result()
        return self._answer("credentials", [*rows, *self.devices])


@pytest.fixture
def fake() -> PairingFake:
    return PairingFake()


@pytest.fixture
def actions(qtbot, fake: PairingFake) -> AppActions:  # type: ignore[no-untyped-def]
    bridge = UiBridge()
    fake.add_listener(bridge.publish_state)
    return AppActions(fake, bridge, lambda: None)


def test_every_copy_says_copied(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    window = MainWindow(actions)  # where no tray shows messages, its line says it
    fake.go_public()
    menu = TrayMenu(actions)
    for label, said in (
        ("Copy public URL", PUBLIC_URL),
        ("Copy curl snippet", "curl snippet (its token lasts an hour)"),
        ("Copy OpenAI settings", "OpenAI settings: base URL and API key"),
    ):
        menu.rebuild()
        with qtbot.waitSignal(actions.notify, timeout=2000) as signal:
            menu.action(label).trigger()
        assert signal.args == ["Copied", said], label
        assert window.feedback.text() == f"Copied: {said}"
    window.close()


def _button(widget: QWidget, text: str) -> QPushButton:
    return next(b for b in widget.findChildren(QPushButton) if b.text() == text)


def test_the_qr_window_and_devices_say_copied(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    fake.go_public()
    actions.show_qr()
    window = actions.qr_window
    qtbot.waitUntil(lambda: window.link is not None)
    _button(window, "Copy link").click()
    assert QGuiApplication.clipboard().text() == window.link.url
    assert window.status.text() == "Copied."
    window.close()
    actions.show_devices()
    devices = actions.devices_window
    devices.new_name.setText("ci job")
    devices.create_button.click()
    qtbot.waitUntil(lambda: devices.new_key.text() != "")
    _button(devices, "Copy key").click()
    assert QGuiApplication.clipboard().text() == "lmg_new_key_for_ci_job"
    assert devices.status.text() == "Copied."
    devices.close()


def test_devices_show_expiry_whole_names_and_hide_revoked(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    long_name = "Anna's iPhone 15 Pro Max (the one in the blue case, kitchen)"
    fake.devices = [
        Credential("device", "d2", long_name, "paired device", 1.8e9, None, 0, 0, True, 1.9e9),
        Credential("key", "k2", "old script", "chat", 1.8e9, None, 0, 0, False, None),
    ]
    actions.show_devices()
    window = actions.devices_window
    qtbot.waitUntil(lambda: window.table.rowCount() == 4)
    assert window.table.horizontalHeaderItem(7).text() == "Expires"
    row = next(i for i, r in enumerate(window.rows) if r.id == "d2")
    assert window.table.item(row, 1).text() == long_name
    assert _as_qt_shows_it(window.table.item(row, 1).toolTip()) == long_name
    assert window.table.item(row, 7).text().startswith("2030-")
    assert window.table.item(0, 7).text() == "—", "no expiry shown as a dash, not a date"
    window.hide_revoked.setChecked(True)
    assert [r.id for r in window.rows] == ["d1", "k1", "d2"]
    window.hide_revoked.setChecked(False)
    assert window.table.rowCount() == 4
    window.close()


def test_revoking_asks_first_and_cancel_keeps_it(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    actions.show_devices()
    window = actions.devices_window
    qtbot.waitUntil(lambda: window.table.rowCount() == 2)
    window.table.selectRow(0)
    window.revoke_button.click()
    assert window.confirm_row.isVisible()
    assert window.confirm_text.text().startswith("Revoke device “Pixel”?")
    assert not window.isModal()
    window.cancel_button.click()
    assert not window.confirm_row.isVisible()
    assert fake.called("revoke") == [], "cancelled: nothing revoked"
    window.revoke_button.click()
    window.confirm_button.click()
    qtbot.waitUntil(lambda: fake.called("revoke") == [("device", "d1")])
    qtbot.waitUntil(lambda: window.status.text() == "Revoked Pixel.")
    window.close()


def test_a_paired_phone_is_named_and_the_code_renews(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    fake.go_public()
    window = QrWindow(fake, actions.bridge)
    window.show()
    qtbot.waitUntil(lambda: window.link is not None and window._devices_before is not None)
    first = window.link
    assert first is not None
    assert window.paired.text() == ""
    fake.devices.append(
        Credential("device", "d9", "Anna's iPhone", "paired device", 2e9, None, 0, 0, True)
    )
    qtbot.waitUntil(lambda: window.paired.text() == "Paired: Anna's iPhone ✓", timeout=5000)
    qtbot.waitUntil(lambda: window.link is not None and window.link.code != first.code)
    assert len(fake.called("pairing_link")) == 2, "one fresh code, not one per check"
    window.close()


# ---- names shown as text, never as markup ---------------------------------------------------

# A device that pairs under this name would, drawn as rich text, say "Admin laptop" in big red
# letters and hide what it is; drawn as text it shows every character.
SPOOF = "<font size=7 color=red>Admin laptop</font>"


def _red_pixels(label: QLabel) -> int:
    image = label.grab().toImage()
    return sum(
        1
        for y in range(image.height())
        for x in range(image.width())
        if (c := QColor(image.pixel(x, y))).red() > 180 and c.green() < 90 and c.blue() < 90
    )


def _as_qt_shows_it(tooltip: str) -> str:
    """What a tooltip reads as on screen: Qt renders it as HTML when it might be rich text."""
    if not Qt.mightBeRichText(tooltip):
        return tooltip
    document = QTextDocument()
    document.setHtml(tooltip)
    return document.toPlainText()


def _shown_literally(label: QLabel, text: str) -> None:
    assert text in label.text()
    assert _red_pixels(label) == 0, "the name's markup was drawn"
    assert label.textFormat() == Qt.TextFormat.PlainText


def test_the_red_pixel_probe_sees_markup(qtbot) -> None:  # type: ignore[no-untyped-def]
    # The probe the tests below rely on: a label that does draw the markup has red pixels.
    label = QLabel(SPOOF)
    qtbot.addWidget(label)
    label.show()
    assert _red_pixels(label) > 50


def test_a_device_named_in_html_is_shown_literally_when_it_pairs(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    fake.go_public()
    window = QrWindow(fake, actions.bridge)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.link is not None and window._devices_before is not None)
    fake.devices.append(Credential("device", "d9", SPOOF, "paired device", 2e9, None, 0, 0, True))
    qtbot.waitUntil(lambda: window.paired.text() == f"Paired: {SPOOF} ✓", timeout=5000)
    _shown_literally(window.paired, SPOOF)


def test_devices_show_a_name_in_html_literally_everywhere(qtbot, fake, actions) -> None:  # type: ignore[no-untyped-def]
    fake.devices = [
        Credential("device", "d2", SPOOF, "paired device", 1.8e9, None, 0, 0, True),
        Credential("device", "d3", SPOOF, "paired device", 1.8e9, None, 0, 0, False),
    ]
    actions.show_devices()
    window = actions.devices_window
    qtbot.waitUntil(lambda: window.table.rowCount() == 4)
    for row in (2, 3):
        item = window.table.item(row, 1)
        assert item.text() == SPOOF
        assert _as_qt_shows_it(item.toolTip()) == SPOOF, "the tooltip shows the name as it is"
    long_value = window.table.item(0, 3).toolTip()
    assert _as_qt_shows_it(long_value) == window.table.item(0, 3).text(), "plain values too"
    window.table.selectRow(2)
    window.revoke_button.click()
    assert window.confirm_text.text() == (
        f"Revoke device “{SPOOF}”? It loses access at once; this cannot be undone."
    )
    _shown_literally(window.confirm_text, SPOOF)
    window.cancel_button.click()
    window.table.selectRow(3)
    window.revoke_button.click()
    assert window.status.text() == f"{SPOOF} is already revoked."
    _shown_literally(window.status, SPOOF)
    window.table.selectRow(2)
    window.revoke_button.click()
    window.confirm_button.click()
    qtbot.waitUntil(lambda: window.status.text() == f"Revoked {SPOOF}.")
    _shown_literally(window.status, SPOOF)
    window.close()


class HostileModels(PairingFake):
    """LM Studio may be hostile (position E): its model ids are anyone's text."""

    def test_connection(
        self, url: str, token: str | None = None
    ) -> concurrent.futures.Future[tuple[bool, list[str]]]:
        return self._answer("test_connection", (True, [SPOOF, "qwen"]), url, token)


def test_settings_show_a_model_id_in_html_literally(qtbot) -> None:  # type: ignore[no-untyped-def]
    fake = HostileModels()
    dialog = SettingsDialog(fake, UiBridge())
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.upstream.text() != "")
    dialog.test_button.click()
    qtbot.waitUntil(lambda: "Connected" in dialog.test_result.text())
    assert dialog.test_result.text() == f"Connected. Models: {SPOOF}, qwen"
    _shown_literally(dialog.test_result, SPOOF)
    assert dialog.models.item(0).text() == SPOOF
    dialog.close()


# ---- the real core: one expiring key per purpose ------------------------------------------


@pytest.fixture
def core(
    tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> Iterator[Callable[[], ThreadedController]]:
    made: list[ThreadedController] = []
    store = MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})

    def build() -> ThreadedController:
        config = Config(
            upstream_url=lmstudio_thread.url,
            server_port=0,
            storage_data_dir=str(tmp_path / "data"),
        )
        controller = ThreadedController(
            Controller(config, config_path=tmp_path / "config.toml", store=store, environ={})
        )
        controller.start().result(20)
        made.append(controller)
        return controller

    yield build
    for controller in made:
        controller.shutdown()


def test_one_expiring_key_per_purpose_reused_until_revoked(core) -> None:  # type: ignore[no-untyped-def]
    import time

    controller = core()
    base, menu_key = controller.openai_settings().result(5)
    assert base.endswith("/v1")
    assert controller.openai_settings(MENU_OPENAI_SETTINGS).result(5)[1] == menu_key
    apps_key = controller.openai_settings(FOR_APPS).result(5)[1]
    assert apps_key != menu_key, "each purpose has its own key"
    assert controller.openai_settings(FOR_APPS).result(5)[1] == apps_key
    keys = [c for c in controller.credentials().result(5) if c.kind == "key"]
    assert len(keys) == 2, "two purposes, two keys: not one per click"
    for key in keys:
        assert key.expires is not None
        assert abs(key.expires - (time.time() + APP_KEY_TTL)) < 60
    menu_record = next(k for k in keys if k.name.startswith(MENU_OPENAI_SETTINGS))
    controller.revoke("key", menu_record.id).result(5)
    fresh = controller.openai_settings().result(5)[1]
    assert fresh not in (menu_key, apps_key), "a revoked key is replaced, not handed out"
    controller.shutdown()
    again = core()
    assert again.openai_settings().result(5)[1] == fresh, "a restart reuses the live key"


def test_a_paired_device_shows_when_it_expires(core) -> None:  # type: ignore[no-untyped-def]
    controller = core()
    link = controller.pairing_link().result(5)
    origin = link.url.split("/#", 1)[0]
    request = urllib.request.Request(
        origin + "/pair",
        data=json.dumps({"code": link.code, "device_name": "Anna's iPhone"}).encode(),
        headers={"Content-Type": "application/json", "Origin": origin},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    (device,) = [c for c in controller.credentials().result(5) if c.kind == "device"]
    assert device.name == "Anna's iPhone" and device.expires is not None
    assert device.expires > device.created + 86400
