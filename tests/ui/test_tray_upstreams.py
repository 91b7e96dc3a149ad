"""The tray shows each upstream's state (issue 18, point 3) when there are several: one line
each in the menu, the tooltip and the main window, from the frozen snapshot the controller
publishes (a real controller's snapshot is tested in test_controller_upstreams.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from pytestqt.qtbot import QtBot

from tests.fake_controller import FakeController
from tray_app.control.controller import AppState
from tray_app.control.upstream_status import UpstreamStatus
from tray_app.ui.actions import AppActions
from tray_app.ui.bridge import UiBridge
from tray_app.ui.tray import MainWindow, TrayMenu, tooltip_for, upstream_lines

LOCAL = UpstreamStatus("local", "http://127.0.0.1:1234", "up", None, 3)
DESK = UpstreamStatus("desk", "http://10.0.0.5:1234", "down", "it refused LM Gate's token (401)", 0)
ATTIC = UpstreamStatus("attic", "http://10.0.0.6:1234", "starting", None, 0)
SPARE = UpstreamStatus("spare", "http://10.0.0.7:1234", "disabled", None, 0)
LINES = [
    "local: up, 3 models",
    "desk: down: it refused LM Gate's token (401)",
    "attic: starting",
    "spare: disabled",
]


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def actions(qtbot: QtBot, fake: FakeController) -> AppActions:
    bridge = UiBridge()
    fake.add_listener(bridge.publish_state)
    return AppActions(fake, bridge, lambda: None)


def publish(qtbot: QtBot, fake: FakeController, actions: AppActions, **changes: object) -> None:
    with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
        fake.publish(**changes)


class TestLines:
    def test_one_per_upstream_when_there_are_several(self) -> None:
        assert upstream_lines(AppState(upstreams=(LOCAL, DESK, ATTIC, SPARE))) == LINES

    def test_none_for_one_whose_state_the_status_line_says(self) -> None:
        assert upstream_lines(AppState(upstreams=(LOCAL,))) == []
        assert upstream_lines(AppState()) == []

    @pytest.mark.parametrize(
        ("status", "words"),
        [
            (UpstreamStatus("a", "u", "up", None, 1), "up, 1 model"),
            (UpstreamStatus("a", "u", "up", None, 0), "up, 0 models"),
            (UpstreamStatus("a", "u", "down", None, 0), "down"),
        ],
    )
    def test_words(self, status: UpstreamStatus, words: str) -> None:
        assert status.words == words


def test_the_menu_lists_each_state_as_text_not_as_actions(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    menu = TrayMenu(actions)
    alone = menu.texts
    publish(qtbot, fake, actions, upstreams=(LOCAL, DESK, ATTIC, SPARE))
    menu.rebuild()
    assert menu.texts[1:5] == LINES, "right under the status line"
    assert [t for t in menu.texts if t not in LINES] == alone, "the rest as before"
    for line in LINES:
        assert not menu.action(line).isEnabled()


def test_an_ampersand_in_a_reason_is_shown_not_taken_for_a_mnemonic(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    odd = UpstreamStatus("desk", "u", "down", "R&D's box answered 502", 0)
    publish(qtbot, fake, actions, upstreams=(LOCAL, odd))
    menu = TrayMenu(actions)
    assert "desk: down: R&D's box answered 502" in menu.texts


def test_the_tooltip_says_each_state(fake: FakeController) -> None:
    state = fake.publish(upstreams=(LOCAL, DESK))
    assert tooltip_for(state).endswith("\nlocal: up, 3 models\n" + LINES[1])
    assert "local:" not in tooltip_for(fake.publish(upstreams=(LOCAL,)))


def test_the_main_window_shows_them_and_makes_no_button_of_them(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    window = MainWindow(actions)
    qtbot.addWidget(window)
    buttons = [b.text() for b in window.buttons]
    hostile = UpstreamStatus("desk", "u", "down", "<b>bold</b> claim", 0)
    publish(qtbot, fake, actions, upstreams=(LOCAL, hostile))
    assert "<br>local: up, 3 models" in window.status.text()
    assert "desk: down: &lt;b&gt;bold&lt;/b&gt; claim" in window.status.text(), "escaped"
    assert [b.text() for b in window.buttons] == buttons
