"""For apps, a QR code a phone app can use (issue 15, point 9): the code on the *For apps* tab
is Chatbox's provider deep link (chatboxai/chatbox-docs, en/guides/providers/import-config.md:
``chatbox://provider/import?config=<base64 JSON>``) with LM Gate's base URL, the tab's one
expiring key and the models LM Gate offers; decoded with zxing-cpp and checked field by field,
then used as Chatbox would: a chat completion at apiHost + apiPath with apiKey. The real
controller, gateway and fake LM Studio; Qt offscreen.

The key lasts 30 days, so the tab shows it only when asked (issue 15, security review): the key
and the link masked behind a Show toggle, the code drawn only after "Show QR for an app" and
taken down after a minute or when the tab or window is left; Copy still copies the real values.
Those run with the controller double."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6")

from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QLineEdit, QPushButton
from pytestqt.qtbot import QtBot

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_controller import FakeController
from tests.fake_lmstudio import FakeLMStudio
from tests.ui.test_ui import chatbox_config, decode
from tray_app.config.settings import Config
from tray_app.control.controller import (
    CHATBOX_MAX_MODELS,
    FOR_APPS,
    Controller,
    Credential,
    ThreadedController,
    chatbox_import_link,
)
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.ui.bridge import UiBridge
from tray_app.ui.qr_window import APPS_QR_SECONDS, QrWindow


@pytest.fixture
def started(
    tmp_path: Path, lmstudio_thread: FakeLMStudio, request: pytest.FixtureRequest
) -> Iterator[ThreadedController]:
    allowed: tuple[str, ...] = getattr(request, "param", ())
    controller = ThreadedController(
        Controller(
            Config(
                upstream_url=lmstudio_thread.url,
                server_port=0,
                streaming_heartbeat_interval=0.0,
                storage_data_dir=str(tmp_path / "data"),
                auth_allowed_models=allowed,
            ),
            config_path=tmp_path / "config.toml",
            store=MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
            environ={},
            watch_interval=0,
        )
    )
    controller.start().result(20)
    yield controller
    controller.shutdown()


def _scanned(qtbot: QtBot, controller: ThreadedController) -> tuple[QrWindow, dict[str, Any]]:
    window = QrWindow(controller, UiBridge())
    qtbot.addWidget(window)
    window.show()
    window.tabs.setCurrentIndex(1)
    qtbot.waitUntil(lambda: window.chatbox_field.text() != "", timeout=10000)
    window.show_apps_qr.click()
    codes = [text for text in decode(window) if text.startswith("chatbox:")]
    assert codes == [window.chatbox_field.text()], "the code on screen is the link to copy"
    return window, chatbox_config(codes[0])


def _chat(url: str, key: str, model: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def test_the_apps_code_is_a_chatbox_link_that_works(
    qtbot: QtBot, started: ThreadedController, lmstudio_thread: FakeLMStudio
) -> None:
    window, config = _scanned(qtbot, started)
    base_url, key = started.openai_settings(FOR_APPS).result(10)
    origin = base_url.removesuffix("/v1")
    assert window.base_url_field.text() == base_url and window.key_field.text() == key
    assert config["id"] == origin.removeprefix("http://")
    assert config["type"] == "openai" and config["urls"] == {"website": origin}
    settings = config["settings"]
    assert settings["apiHost"] == origin
    assert settings["apiPath"] == "/v1/chat/completions"
    assert settings["apiKey"] == key, "the tab's one expiring key, not a new one per view"
    assert settings["models"] == [
        {"modelId": "qwen2.5-7b-instruct"},
        {"modelId": "llama-3.2-1b-instruct"},
        {"modelId": "nomic-embed-text-v1.5"},
    ]
    # What Chatbox then sends: it works through the gateway, with LM Studio's token behind it.
    answer = _chat(
        settings["apiHost"] + settings["apiPath"],
        settings["apiKey"],
        settings["models"][0]["modelId"],
    )
    assert answer["object"] == "chat.completion"
    assert lmstudio_thread.received[-1].path == "/v1/chat/completions"
    window.close()


@pytest.mark.parametrize("started", [("llama-3.2-1b-instruct",)], indirect=True)
def test_the_link_lists_only_the_models_settings_allow(
    qtbot: QtBot, started: ThreadedController
) -> None:
    window, config = _scanned(qtbot, started)
    assert config["settings"]["models"] == [{"modelId": "llama-3.2-1b-instruct"}]
    assert "with 1 model." in window.apps_hint.text()
    window.close()


def test_the_link_survives_any_base64_and_caps_its_models() -> None:
    # Keys and hosts whose base64 holds "+" and "/": percent-encoded, so no "+" turns into a
    # space on the way; and a long model list stays a code a camera can read.
    models = [f"model-{n}?>" for n in range(40)]
    link = chatbox_import_link("https://a.example/v1", "lmg_>>>???", models)
    assert "+" not in link and "/" not in link.split("?config=", 1)[1]
    config = chatbox_config(link)
    assert config["settings"]["apiKey"] == "lmg_>>>???"
    assert config["settings"]["apiHost"] == "https://a.example"
    assert config["id"] == "a.example"
    assert [m["modelId"] for m in config["settings"]["models"]] == models[:CHATBOX_MAX_MODELS]


# ---- the key is shown only when asked ----------------------------------------------------------

KEY = "lmg_fake_app_key"  # what the double's openai_settings answers


def _apps_tab(qtbot: QtBot, now: list[float]) -> tuple[QrWindow, FakeController]:
    fake = FakeController()
    fake.clock = lambda: now[0]
    fake.go_public()
    window = QrWindow(fake, UiBridge(), clock=lambda: now[0])
    qtbot.addWidget(window)
    window.resize(460, 900)  # room for the whole tab, so a code on it would decode
    window.show()
    window.tabs.setCurrentIndex(1)
    qtbot.waitUntil(lambda: window.show_apps_qr.isEnabled())
    qtbot.wait(50)
    return window, fake


def _chatbox_codes(window: QrWindow) -> list[str]:
    return [text for text in decode(window) if text.startswith("chatbox:")]


def _masked(field: QLineEdit) -> bool:
    shown = field.displayText()
    return field.echoMode() == QLineEdit.EchoMode.Password and field.text() not in shown


def _copy_button_beside(field: QLineEdit) -> QPushButton:
    """The Copy button on the field's own row: the one drawn level with it."""
    parent = field.parentWidget()
    assert parent is not None
    row = field.geometry()
    (button,) = [
        b
        for b in parent.findChildren(QPushButton)
        if b.text() == "Copy" and b.geometry().center().y() in range(row.top(), row.bottom() + 1)
    ]
    return button


class TestTheKeyIsShownOnlyWhenAsked:
    def test_opening_the_tab_shows_no_key_no_link_and_no_code(self, qtbot: QtBot) -> None:
        window, _ = _apps_tab(qtbot, [1e9])
        assert window.key_field.text() == KEY and window.chatbox_field.text().startswith("chatbox:")
        assert _masked(window.key_field), "the key is masked as the tab opens"
        assert _masked(window.chatbox_field), "the link holds the key: masked too"
        assert KEY not in window.chatbox_field.displayText()
        assert _chatbox_codes(window) == [], "no code until asked"
        assert window.apps_qr.pixmap().isNull()

    def test_copy_copies_the_real_values_while_masked(self, qtbot: QtBot) -> None:
        window, _ = _apps_tab(qtbot, [1e9])
        for field in (window.key_field, window.chatbox_field):
            _copy_button_beside(field).click()
            assert QGuiApplication.clipboard().text() == field.text()
            assert _masked(field), "copying does not unmask"
        assert QGuiApplication.clipboard().text().startswith("chatbox://provider/import?")

    def test_show_unmasks_one_field_and_hide_masks_it_again(self, qtbot: QtBot) -> None:
        window, _ = _apps_tab(qtbot, [1e9])
        window.key_show.click()
        assert window.key_field.displayText() == KEY and window.key_show.text() == "Hide"
        assert _masked(window.chatbox_field), "only the field asked for"
        window.key_show.click()
        assert _masked(window.key_field) and window.key_show.text() == "Show"
        window.chatbox_show.click()
        assert window.chatbox_field.displayText() == window.chatbox_field.text()

    def test_the_code_shows_on_request_and_hides_after_its_countdown(self, qtbot: QtBot) -> None:
        now = [1e9]
        window, _ = _apps_tab(qtbot, now)
        window.key_show.click()
        window.show_apps_qr.click()
        assert _chatbox_codes(window) == [window.chatbox_field.text()]
        assert window.apps_qr_countdown.text() == "The code hides in 1:00"
        now[0] += APPS_QR_SECONDS - 1
        window._apps_tick()
        assert window.apps_qr_countdown.text() == "The code hides in 0:01"
        assert _chatbox_codes(window) == [window.chatbox_field.text()]
        now[0] += 1
        window._apps_tick()
        assert _chatbox_codes(window) == [], "taken down when the countdown ends"
        assert window.apps_qr_countdown.text() == ""
        assert _masked(window.key_field), "and the key masked again"
        window.show_apps_qr.click()
        assert _chatbox_codes(window) == [window.chatbox_field.text()], "shown again on request"

    def test_the_countdown_runs_on_its_own(self, qtbot: QtBot) -> None:
        now = [1e9]
        window, _ = _apps_tab(qtbot, now)
        window.show_apps_qr.click()
        now[0] += APPS_QR_SECONDS
        qtbot.waitUntil(lambda: window.apps_qr.pixmap().isNull(), timeout=3000)
        assert _chatbox_codes(window) == []

    def test_leaving_the_tab_hides_the_code_and_masks_the_key(self, qtbot: QtBot) -> None:
        window, fake = _apps_tab(qtbot, [1e9])
        window.key_show.click()
        window.chatbox_show.click()
        window.show_apps_qr.click()
        window.tabs.setCurrentIndex(0)
        window.tabs.setCurrentIndex(1)
        qtbot.wait(50)
        assert _chatbox_codes(window) == [] and window.apps_qr_countdown.text() == ""
        assert _masked(window.key_field) and _masked(window.chatbox_field)
        assert not window.key_show.isChecked() and not window.chatbox_show.isChecked()
        assert len(fake.called("openai_settings")) == 1, "the same key, still one per window"

    @pytest.mark.parametrize("leave", ["hide", "minimize"])
    def test_leaving_the_window_hides_the_code_and_masks_the_key(
        self, qtbot: QtBot, leave: str
    ) -> None:
        window, _ = _apps_tab(qtbot, [1e9])
        window.key_show.click()
        window.show_apps_qr.click()
        if leave == "hide":
            window.hide()
        else:
            window.showMinimized()
            qtbot.waitUntil(lambda: window.apps_qr.pixmap().isNull(), timeout=3000)
        window.showNormal()
        qtbot.wait(50)
        assert _chatbox_codes(window) == [] and _masked(window.key_field)

    def test_the_tab_says_how_to_revoke_the_key(self, qtbot: QtBot) -> None:
        window, _ = _apps_tab(qtbot, [1e9])
        tab = window.tabs.widget(1)
        assert tab is not None
        words = " ".join(
            label.text().replace("\n", " ") for label in tab.findChildren(type(window.apps_hint))
        )
        assert "Devices & tokens" in words and "Revoke" in words and "for-apps" in words
        assert "30 days" in words


def test_the_revoke_advice_names_the_real_keys_row(started: ThreadedController) -> None:
    # The tab tells the owner to look for "for-apps …" in Devices & tokens: that is its name.
    started.openai_settings(FOR_APPS).result(10)
    rows: list[Credential] = started.credentials().result(10)
    assert [r.kind for r in rows if r.active and r.name.startswith("for-apps ")] == ["key"]
