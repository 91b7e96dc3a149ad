"""Choosing how to go public (issue 20, point 5), offscreen with the controller double: the
first-run guide shows the options side by side and offers the one that needs no account in one
click when its agent is installed; Settings describes the chosen one and shows only its own
fields. Screenshots: test-artifacts/guide-going-public.png, settings-going-public.png."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from pytestqt.qtbot import QtBot

from tests.fake_controller import FakeController
from tests.helpers import REPO_ROOT, publish_screenshot
from tray_app.control.controller import Phase
from tray_app.control.tunnel_setup import CHOOSE
from tray_app.tunnel.choices import CHOICES
from tray_app.ui.actions import AppActions
from tray_app.ui.bridge import UiBridge
from tray_app.ui.settings_dialog import SettingsDialog
from tray_app.ui.tray import tooltip_for

ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def actions(qtbot: QtBot, fake: FakeController) -> AppActions:
    bridge = UiBridge()
    fake.add_listener(bridge.publish_state)
    return AppActions(fake, bridge, lambda: None)


def needs_a_tunnel(
    qtbot: QtBot, fake: FakeController, actions: AppActions, setup: str = CHOOSE
) -> None:
    with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
        fake.publish(phase=Phase.PRIVATE, needs_tunnel=True, tunnel_setup=setup)


def test_the_guide_compares_the_options_and_goes_public_in_one_click(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    needs_a_tunnel(qtbot, fake, actions)
    guide = actions.guide
    qtbot.waitUntil(lambda: guide.isVisible() and guide.choices.text() != "")
    table = guide.choices.text()
    for choice in CHOICES:
        assert choice.title in table and choice.reach in table
    # The double says only cloudflared is installed: the others say so in their row.
    assert "Tailscale Serve\n(tailscale not installed)" in table
    assert "(cloudflared not installed)" not in table
    assert guide.one_click.isVisible() and guide.one_click_note.isVisible()
    assert "no uptime promise" in guide.one_click_note.text()
    guide.adjustSize()
    ARTIFACTS.mkdir(exist_ok=True)
    guide.grab().save(str(ARTIFACTS / "guide-going-public.png"))
    publish_screenshot(ARTIFACTS / "guide-going-public.png", "guide-going-public.png")
    guide.one_click.click()
    qtbot.waitUntil(lambda: fake.called("choose_tunnel") == [("cloudflare-quick",)])
    assert not guide.isVisible()


def test_what_the_controller_says_is_text_never_markup(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    needs_a_tunnel(qtbot, fake, actions, setup="Finish it in Settings: <b>not markup</b>.")
    qtbot.waitUntil(lambda: actions.guide.isVisible())
    assert "&lt;b&gt;not markup&lt;/b&gt;" in actions.guide.text.text()


def test_without_the_agent_there_is_no_one_click_choice(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    original = fake.tunnel_choices

    def nothing_installed():  # type: ignore[no-untyped-def]
        future = original()
        rows = tuple(type(row)(row.choice, row.choice.program is None) for row in future.result())
        return fake._answer("tunnel_choices", rows)

    fake.tunnel_choices = nothing_installed  # type: ignore[method-assign]
    needs_a_tunnel(qtbot, fake, actions)
    guide = actions.guide
    qtbot.waitUntil(lambda: "cloudflared not installed" in guide.choices.text())
    assert not guide.one_click.isVisible() and not guide.one_click_note.isVisible()
    assert fake.called("choose_tunnel") == []


def test_settings_describe_the_chosen_way_and_show_only_its_fields(
    qtbot: QtBot, fake: FakeController
) -> None:
    dialog = SettingsDialog(fake, UiBridge())
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.upstream.text() == "http://127.0.0.1:1234")
    qtbot.waitUntil(lambda: "ngrok's edge" in dialog.provider_info.text())
    assert dialog.ngrok_token.isVisible() and dialog.domain.isVisible()
    assert not dialog.cloudflare_token.isVisible()

    dialog.provider.setCurrentIndex(dialog.provider.findData("cloudflare-named"))
    assert "Cloudflare's edge" in dialog.provider_info.text()
    assert "127.0.0.1:<LM Gate's port>" in dialog.provider_info.text()
    assert dialog.cloudflare_token.isVisible() and dialog.cloudflare_hostname.isVisible()
    assert not dialog.ngrok_token.isVisible() and not dialog.domain.isVisible()
    assert "not installed" not in dialog.provider_info.text()
    dialog.adjustSize()
    ARTIFACTS.mkdir(exist_ok=True)
    dialog.grab().save(str(ARTIFACTS / "settings-going-public.png"))
    publish_screenshot(ARTIFACTS / "settings-going-public.png", "settings-going-public.png")

    assert not dialog.compare_table.isVisible()
    dialog.compare_button.click()
    assert dialog.compare_table.isVisible()
    for choice in CHOICES:
        assert choice.title in dialog.compare_table.text()
    dialog.adjustSize()
    dialog.grab().save(str(ARTIFACTS / "settings-compare.png"))
    dialog.compare_button.click()
    assert not dialog.compare_table.isVisible()

    dialog.provider.setCurrentIndex(dialog.provider.findData("tailscale-serve"))
    assert "only your tailnet's devices" in dialog.provider_info.text()
    assert "tailscale is not installed" in dialog.provider_info.text()
    assert "never downloads" in dialog.provider_info.text()

    dialog.provider.setCurrentIndex(dialog.provider.findData("cloudflare-named"))
    token = "eyJhIjoiYWNjb3VudCIsInQiOiJ0dW5uZWwiLCJzIjoic2VjcmV0In0="
    dialog.cloudflare_token.setText(token)
    dialog.cloudflare_hostname.setText("chat.example.com")
    dialog.save_button.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "Saved.")
    ((new,),) = fake.called("save_settings")
    assert new.tunnel_provider == "cloudflare-named"
    assert new.tunnel_cloudflare_hostname == "chat.example.com"
    assert new.new_cloudflare_token == token and new.new_ngrok_token is None
    qtbot.waitUntil(lambda: "stored" in dialog.cloudflare_token.placeholderText())
    assert dialog.cloudflare_token.text() == "", "secret fields never show a value"


def test_a_tunnel_that_does_not_stream_is_said_once_and_shown(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    said: list[tuple[str, str]] = []
    actions.notify.connect(lambda title, message: said.append((title, message)))
    note = "This tunnel delivers streamed answers in one piece: people see each answer only …"
    for _ in range(2):  # a second state with the same finding says nothing new
        with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
            fake.publish(
                phase=Phase.PUBLIC,
                public_url="https://x.trycloudflare.com",
                stream_note=note,
                streams_in_one_piece=True,
            )
    assert said.count(("This tunnel does not stream", note)) == 1
    assert note in tooltip_for(actions.state)
    with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
        fake.publish(
            stream_note="Streams: first chunk after 40 ms, largest gap 104 ms.",
            streams_in_one_piece=False,
        )
    assert "largest gap 104 ms" in tooltip_for(actions.state)
    assert [title for title, _ in said].count("This tunnel does not stream") == 1


def test_installing_the_ngrok_agent_asks_first_and_says_what_comes_from_where(
    qtbot: QtBot, fake: FakeController
) -> None:
    # The double: only cloudflared is installed, so ngrok offers its installer.
    dialog = SettingsDialog(fake, UiBridge())
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: "ngrok's edge" in dialog.provider_info.text())
    assert dialog.install_button.isVisible()
    assert not dialog.install_confirm.isVisible() and not dialog.install_question.isVisible()
    dialog.install_button.click()
    qtbot.waitUntil(lambda: dialog.install_question.isVisible())
    question = dialog.install_question.text()
    assert "https://bin.example/ngrok-v3-stable-linux-amd64.tgz" in question
    assert "/home/me/.config/ngrok" in question
    assert fake.called("install_ngrok_agent") == [], "asking downloads nothing"
    dialog.install_cancel.click()
    assert not dialog.install_question.isVisible() and dialog.install_button.isVisible()
    dialog.install_button.click()
    qtbot.waitUntil(lambda: dialog.install_confirm.isVisible())
    dialog.adjustSize()
    dialog.grab().save(str(ARTIFACTS / "settings-install-ngrok.png"))
    dialog.install_confirm.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "Installed ngrok 3.19.1 at /home/me/ngrok.")
    assert fake.called("install_ngrok_agent") == [()]
    assert not dialog.install_question.isVisible()
    # Another way of going public has nothing to install.
    dialog.provider.setCurrentIndex(dialog.provider.findData("lan"))
    assert not dialog.install_button.isVisible()


def test_a_tunnel_back_at_a_new_url_says_so(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    said: list[tuple[str, str]] = []
    actions.notify.connect(lambda title, message: said.append((title, message)))
    for phase, url in [
        (Phase.PUBLIC, "https://first.trycloudflare.com"),
        (Phase.RECONNECTING, "https://first.trycloudflare.com"),
        (Phase.PUBLIC, "https://first.trycloudflare.com"),  # back at the same URL: nothing new
        (Phase.RECONNECTING, "https://first.trycloudflare.com"),
        (Phase.PUBLIC, "https://second.trycloudflare.com"),
    ]:
        with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
            fake.publish(phase=phase, public_url=url)
    changed = [message for title, message in said if title == "The public URL changed"]
    assert len(changed) == 1 and changed[0].startswith("https://second.trycloudflare.com")
    assert "pair phones again" in changed[0]


def test_what_an_agent_printed_is_shown_as_text_never_markup(
    qtbot: QtBot, fake: FakeController, actions: AppActions
) -> None:
    # An agent's last line ends up in the error message, a host it named in the URL.
    from tray_app.ui.tray import MainWindow

    window = MainWindow(actions)
    qtbot.addWidget(window)
    hostile = '<a href="https://evil.example/fix">your key leaked, click here</a><img src=x>'
    with qtbot.waitSignal(actions.bridge.state_changed, timeout=2000):
        fake.publish(phase=Phase.ERROR, message=hostile, warning=hostile, port_note=hostile)
    shown = window.status.text()
    assert "<a href" not in shown and "<img" not in shown
    assert shown.count("&lt;a href=&quot;https://evil.example/fix&quot;&gt;") == 3
