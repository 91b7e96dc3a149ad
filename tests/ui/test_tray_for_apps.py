"""For apps, a QR code a phone app can use (issue 15, point 9): the code on the *For apps* tab
is Chatbox's provider deep link (chatboxai/chatbox-docs, en/guides/providers/import-config.md:
``chatbox://provider/import?config=<base64 JSON>``) with LM Gate's base URL, the tab's one
expiring key and the models LM Gate offers; decoded with zxing-cpp and checked field by field,
then used as Chatbox would: a chat completion at apiHost + apiPath with apiKey. The real
controller, gateway and fake LM Studio; Qt offscreen."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6")

from pytestqt.qtbot import QtBot

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import FakeLMStudio
from tests.ui.test_ui import chatbox_config, decode
from tray_app.config.settings import Config
from tray_app.control.controller import (
    CHATBOX_MAX_MODELS,
    FOR_APPS,
    Controller,
    ThreadedController,
    chatbox_import_link,
)
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.ui.bridge import UiBridge
from tray_app.ui.qr_window import QrWindow


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
