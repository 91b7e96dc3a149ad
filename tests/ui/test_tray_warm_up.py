"""The tray's "Warm up a model…" (issue 17, point 3): the owner picks one of LM Studio's models
and LM Gate loads it through the running gateway's model guard, so the load waits for other
models' answers instead of cutting them off. The window says what is loading; the outcome
comes as a tray message. The real controller and gateway in front of the fake LM Studio with
simulated memory, on a loop thread of its own; Qt offscreen."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tray_app.config.settings import Config
from tray_app.control.controller import Controller, ThreadedController
from tray_app.control.loop_thread import LoopThread
from tray_app.errors import LMGateError
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.ui.actions import AppActions
from tray_app.ui.bridge import UiBridge
from tray_app.ui.tray import MainWindow, TrayMenu
from tray_app.ui.warm_up_window import ASKING, NO_MODELS, PICK, WarmUpWindow

QWEN, LLAMA, EMBED = MODELS
WARM_UP = "Warm up a model…"
Make = Callable[..., ThreadedController]


@pytest.fixture
def lmstudio(lmstudio_thread: FakeLMStudio) -> FakeLMStudio:
    lmstudio_thread.loaded = [QWEN]  # LM Studio's memory, one model at a time
    return lmstudio_thread


def _controller(lmstudio: FakeLMStudio, tmp_path: Path, **config: Any) -> Controller:
    return Controller(
        Config(
            upstream_url=lmstudio.url,
            server_port=0,
            streaming_heartbeat_interval=0.0,
            storage_data_dir=str(tmp_path / "data"),
            **config,
        ),
        config_path=tmp_path / "config.toml",
        store=MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
        environ={},
        watch_interval=0,
    )


@pytest.fixture
def make(lmstudio: FakeLMStudio, tmp_path: Path) -> Iterator[Make]:
    made: list[ThreadedController] = []

    def build(**config: Any) -> ThreadedController:
        controller = ThreadedController(_controller(lmstudio, tmp_path, **config))
        made.append(controller)
        controller.start().result(20)
        return controller

    yield build
    for controller in made:
        controller.shutdown()


def _actions(controller: ThreadedController) -> AppActions:
    bridge = UiBridge()
    controller.add_listener(bridge.publish_state)
    return AppActions(controller, bridge, lambda: None)


def _opened(qtbot: QtBot, actions: AppActions) -> WarmUpWindow:
    """The window as the menu opens it, once LM Studio's models are listed."""
    menu = TrayMenu(actions)
    menu.rebuild()
    assert menu.action(WARM_UP).isEnabled()
    menu.action(WARM_UP).trigger()
    window = actions.warm_up_window
    assert window is not None
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.status.text() != ASKING, timeout=10000)
    return window


def _pick(window: WarmUpWindow, model: str) -> None:
    window.models.setCurrentRow(window.listed.index(model))


class TestTheMenu:
    def test_offers_the_warm_up_only_while_lm_gate_runs(
        self, qtbot: QtBot, lmstudio: FakeLMStudio, tmp_path: Path, make: Make
    ) -> None:
        stopped = ThreadedController(_controller(lmstudio, tmp_path))
        menu = TrayMenu(_actions(stopped))
        assert WARM_UP in menu.texts
        assert not menu.action(WARM_UP).isEnabled(), "nothing runs that could load it"
        running = TrayMenu(_actions(make()))
        assert running.action(WARM_UP).isEnabled()

    def test_opens_a_window_that_lists_lm_studio_s_models_and_does_not_block(
        self, qtbot: QtBot, make: Make
    ) -> None:
        actions = _actions(make())
        window = _opened(qtbot, actions)
        assert window.isVisible() and not window.isModal()
        assert window.listed == list(MODELS)
        assert window.status.text() == PICK
        assert window.models.currentItem().text() == QWEN, "one is picked: Load works at once"
        assert window.load_button.isEnabled()

    def test_lists_only_the_models_settings_allow(self, qtbot: QtBot, make: Make) -> None:
        window = _opened(qtbot, _actions(make(auth_allowed_models=(LLAMA,))))
        assert window.listed == [LLAMA]

    def test_without_models_it_says_what_to_do_and_loads_nothing(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        window = _opened(qtbot, _actions(make(auth_allowed_models=("not-downloaded",))))
        assert window.listed == [] and window.status.text() == NO_MODELS
        assert not window.load_button.isEnabled()
        window.load()
        qtbot.wait(100)
        assert window.loading is None and not lmstudio.loads

    def test_lm_studio_refusing_the_list_is_said_in_the_window(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        actions = _actions(make())
        lmstudio.behaviour.require_token = "sk-lm-a-new-token"  # changed in LM Studio since
        window = _opened(qtbot, actions)
        assert window.listed == [] and not window.load_button.isEnabled()
        assert window.status.text() == (
            f"LM Studio at {lmstudio.url} requires an API token (401); enter it in Settings."
        )


class TestWarmingUp:
    def test_loads_the_model_and_says_how_long_it_took(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        lmstudio.behaviour.load_delay = 0.3
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, LLAMA)
        with qtbot.waitSignal(actions.notify, timeout=10000) as said:
            window.load_button.click()
            assert window.status.text() == f"Loading {LLAMA}…"
            assert not window.load_button.isEnabled(), "one load at a time from here"
        title, message = said.args or []
        assert title == "LM Gate"
        shown = re.fullmatch(rf"{re.escape(LLAMA)} is loaded \((\d+\.\d) s\)", message)
        assert shown is not None, message
        assert float(shown[1]) >= 0.3, "the load's own time, not the click's"
        assert window.status.text() == message and window.loading is None
        assert window.load_button.isEnabled()
        assert lmstudio.loaded == [LLAMA], "LM Studio made room for it"
        assert lmstudio.loads == Counter({LLAMA: 1})
        loads = [r.json() for r in lmstudio.native if r.path == "/api/v1/models/load"]
        assert loads == [{"model": LLAMA}], "asked of LM Studio's model API, once"

    def test_a_loaded_model_is_left_as_it_is(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, QWEN)
        with qtbot.waitSignal(actions.notify, timeout=10000) as said:
            window.models.itemDoubleClicked.emit(window.models.currentItem())
        assert said.args == ["LM Gate", f"{QWEN} was loaded already"]
        assert not lmstudio.loads and lmstudio.loaded == [QWEN]

    def test_the_outcome_reaches_the_tray_after_the_window_is_closed(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        lmstudio.behaviour.load_delay = 0.5
        actions = _actions(make())
        main = MainWindow(actions)  # where no tray shows messages, its line says it
        qtbot.addWidget(main)
        window = _opened(qtbot, actions)
        _pick(window, EMBED)
        window.load()
        window.close()
        qtbot.waitUntil(lambda: main.feedback.text().startswith(f"LM Gate: {EMBED} is loaded ("))
        assert lmstudio.loaded == [EMBED]

    def test_opening_the_window_again_while_loading_still_says_loading(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        lmstudio.behaviour.load_delay = 1.5
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, LLAMA)
        window.load()
        actions.show_warm_up()  # the menu item again: the same window, the list asked anew
        assert actions.warm_up_window is window
        qtbot.waitUntil(lambda: window.listed == list(MODELS), timeout=5000)
        assert window.status.text() == f"Loading {LLAMA}…"
        assert not window.load_button.isEnabled()
        qtbot.waitUntil(lambda: window.loading is None, timeout=10000)
        assert lmstudio.loads == Counter({LLAMA: 1})


class TestFailures:
    def test_a_failed_load_says_lm_studio_s_reason(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        lmstudio.behaviour.load_error = "not enough memory for llama"
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, LLAMA)
        with qtbot.waitSignal(actions.notify, timeout=10000) as said:
            window.load()
        words = f"LM Studio could not load '{LLAMA}': not enough memory for llama"
        assert said.args == ["LM Gate", words]
        assert window.status.text() == words
        assert window.loading is None and window.load_button.isEnabled(), "free to try again"
        assert lmstudio.loaded == [QWEN]

    def test_a_model_gone_from_lm_studio_since_it_was_listed_is_not_found(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, LLAMA)
        lmstudio.behaviour.models = (QWEN, EMBED)  # deleted in LM Studio meanwhile
        with qtbot.waitSignal(actions.notify, timeout=10000) as said:
            window.load()
        assert said.args == [
            "LM Gate",
            f"The model '{LLAMA}' does not exist or you do not have access to it.",
        ]
        assert not lmstudio.loads

    def test_a_load_past_models_load_timeout_is_given_up_on(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        lmstudio.behaviour.load_delay = 3.0
        actions = _actions(make(models_load_timeout=1.0))
        window = _opened(qtbot, actions)
        _pick(window, LLAMA)
        with qtbot.waitSignal(actions.notify, timeout=10000) as said:
            window.load()
        message = (said.args or ["", ""])[1]
        assert "did not finish loading" in message and "within 1 s" in message

    def test_lm_gate_not_running_is_said_plainly(
        self, qtbot: QtBot, lmstudio: FakeLMStudio, tmp_path: Path
    ) -> None:
        thread = LoopThread()
        thread.start()
        try:
            controller = ThreadedController(_controller(lmstudio, tmp_path), thread)
            with pytest.raises(LMGateError, match=r"^LM Gate is not running"):
                controller.warm_up(LLAMA).result(10)
            actions = _actions(controller)
            actions.show_warm_up()  # reachable from the window even so: it says why not
            window = actions.warm_up_window
            assert window is not None
            qtbot.addWidget(window)
            qtbot.waitUntil(lambda: window.listed == list(MODELS), timeout=10000)
            with qtbot.waitSignal(actions.notify, timeout=10000) as said:
                window.load()
            assert said.args == [
                "LM Gate",
                "LM Gate is not running, so it cannot load a model; start it first.",
            ]
            assert not lmstudio.loads
        finally:
            thread.stop()


def _chat_stream(url: str, key: str, model: str) -> str:
    """A streamed answer read to its end, as a chat app reads it."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    request = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return str(response.read().decode())


class TestTheGuardOrdersIt:
    def test_the_load_waits_for_an_answer_from_the_loaded_model(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        """Without the guard LM Studio would evict QWEN mid-answer (its bug #671)."""
        lmstudio.behaviour.chunk_delay = 0.3  # five chunks: an answer of about 1.5 s
        controller = make()
        actions = _actions(controller)
        window = _opened(qtbot, actions)
        base, key = controller.openai_settings().result(10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_chat_stream, base, key, QWEN)
            qtbot.waitUntil(lambda: len(lmstudio.chunk_sent_at) >= 1, timeout=5000)
            _pick(window, LLAMA)
            with qtbot.waitSignal(actions.notify, timeout=15000) as said:
                window.load()
            streamed = answer.result(10)
        assert streamed.rstrip().endswith("data: [DONE]"), "the answer ran to its end"
        assert lmstudio.streams_cut == [] and lmstudio.evicted == [QWEN]
        assert (said.args or ["", ""])[1].startswith(f"{LLAMA} is loaded (")
        assert lmstudio.loaded == [LLAMA]


class TestResponsiveness:
    def test_the_menu_works_while_a_slow_load_runs(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        lmstudio.behaviour.load_delay = 3.0
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, LLAMA)
        started = time.monotonic()
        window.load()
        assert time.monotonic() - started < 0.5, "load() hands the work to the loop thread"
        menu = TrayMenu(actions)
        # The Qt thread and the controller's loop both answer while LM Studio loads.
        for _ in range(3):
            menu.menu.aboutToShow.emit()
            with qtbot.waitSignal(actions.notify, timeout=2000) as copied:
                menu.action("Copy OpenAI settings").trigger()
            assert copied.args == ["Copied", "OpenAI settings: base URL and API key"]
        assert time.monotonic() - started < 2.5 and window.loading == LLAMA
        # The load reaches LM Studio on the loop thread: on a busy machine a moment later.
        qtbot.waitUntil(lambda: lmstudio.loaded == [], timeout=1500)
        assert window.loading == LLAMA, "still loading: QWEN made room, LLAMA not in yet"
        window.load_button.click()  # disabled: a second click starts no second load
        with qtbot.waitSignal(actions.notify, timeout=10000) as said:
            pass
        assert re.fullmatch(rf"{re.escape(LLAMA)} is loaded \(3\.\d s\)", (said.args or [""])[-1])
        assert lmstudio.loads == Counter({LLAMA: 1})


class TestNamesAreText:
    def test_a_model_named_in_markup_is_shown_as_text(
        self, qtbot: QtBot, make: Make, lmstudio: FakeLMStudio
    ) -> None:
        """LM Studio names its models; the names are shown, never drawn as HTML."""
        named = "<b>bold</b><img src=x>"
        lmstudio.behaviour.models = (QWEN, named)
        actions = _actions(make())
        window = _opened(qtbot, actions)
        _pick(window, named)
        assert window.status.textFormat() == Qt.TextFormat.PlainText
        with qtbot.waitSignal(actions.notify, timeout=10000):
            window.load()
            assert window.status.text() == f"Loading {named}…"
        assert lmstudio.loaded == [named]
