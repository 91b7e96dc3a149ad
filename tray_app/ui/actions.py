"""What the user can do, in one place: the tray menu and the fallback window both call these."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from tray_app.control.controller import AppState, Phase
from tray_app.control.tunnel_setup import (
    NO_ACCOUNT_NOTE,
    NO_ACCOUNT_PROVIDER,
    ChoiceRow,
)
from tray_app.paths import user_log_dir
from tray_app.ui.bridge import UiBridge, ignore
from tray_app.ui.devices_window import DevicesWindow
from tray_app.ui.port import ControllerPort
from tray_app.ui.qr_window import QrWindow
from tray_app.ui.settings_dialog import SettingsDialog
from tray_app.ui.tunnel_table import ChoiceTable
from tray_app.ui.warm_up_window import WarmUpWindow


def log_dir() -> Path:
    return user_log_dir()


class GuideWindow(QWidget):
    """First run: what to do, instead of an error; the ways to go public side by side, and
    the one that needs no account in one click when its agent is installed."""

    def __init__(self, actions: AppActions) -> None:
        super().__init__()
        self.setWindowTitle("LM Gate — getting started")
        self._actions = actions
        self.text = QLabel("")
        self.text.setWordWrap(True)
        self.text.setMinimumWidth(520)
        self.choices = ChoiceTable()
        self.choices.setVisible(False)
        self.one_click = QPushButton("Go public now with a Cloudflare quick tunnel (no account)")
        self.one_click.clicked.connect(lambda: actions.choose_tunnel(NO_ACCOUNT_PROVIDER))
        self.one_click.setVisible(False)
        self.one_click_note = QLabel(f"Cloudflare quick tunnels: {NO_ACCOUNT_NOTE}.")
        self.one_click_note.setTextFormat(Qt.TextFormat.PlainText)
        self.one_click_note.setWordWrap(True)
        self.one_click_note.setVisible(False)
        settings = QPushButton("Open Settings")
        settings.clicked.connect(actions.show_settings)
        retry = QPushButton("Try going public again")
        retry.clicked.connect(actions.go_public)
        layout = QVBoxLayout(self)
        layout.addWidget(self.text)
        layout.addWidget(self.choices)
        layout.addWidget(self.one_click)
        layout.addWidget(self.one_click_note)
        layout.addWidget(settings)
        layout.addWidget(retry)

    def explain(self, state: AppState, rows: tuple[ChoiceRow, ...] = ()) -> None:
        steps = []
        if state.needs_lmstudio:
            steps.append(
                "<b>Start LM Studio's server.</b> In LM Studio open the Developer tab "
                "and press <i>Start Server</i> (or run <code>lms server start</code>). "
                "LM Gate expects it at the LM Studio URL in Settings."
            )
        if state.needs_tunnel:
            steps.append(
                "<b>Going public.</b> "
                + html.escape(state.tunnel_setup or "Pick one of the ways below in Settings.")
            )
        self.text.setText("<br><br>".join(steps) or "All set: choose Go public.")
        self.choices.fill(rows if state.needs_tunnel else ())
        self.choices.setVisible(state.needs_tunnel and bool(rows))
        no_account = next(
            (row for row in rows if row.choice.provider.value == NO_ACCOUNT_PROVIDER), None
        )
        one_click = state.needs_tunnel and no_account is not None and no_account.program_found
        self.one_click.setVisible(one_click)
        self.one_click_note.setVisible(one_click)


class AppActions(QObject):
    notify = Signal(str, str)  # title, message: shown by the tray where it can

    def __init__(
        self, controller: ControllerPort, bridge: UiBridge, quit_app: Callable[[], None]
    ) -> None:
        super().__init__()
        self.controller = controller
        self.bridge = bridge
        self._quit_app = quit_app
        self.state = controller.state
        self.qr_window: QrWindow | None = None
        self.settings_window: SettingsDialog | None = None
        self.devices_window: DevicesWindow | None = None
        self.warm_up_window: WarmUpWindow | None = None
        self.guide = GuideWindow(self)
        self.last_error = ""
        self._guide_shown = False
        self._public_url: str | None = None  # the last public URL the owner was told of
        bridge.state_changed.connect(self._on_state)

    def _on_state(self, state: AppState) -> None:
        previous, self.state = self.state, state
        if state.phase == Phase.PUBLIC and state.public_url:
            known, self._public_url = self._public_url, state.public_url
            if known is not None and known != state.public_url:
                # A quick tunnel comes back at a new random URL: phones paired through the
                # old one no longer reach LM Gate.
                self.notify.emit(
                    "The public URL changed",
                    f"{state.public_url} — the old one no longer works: show the QR code to "
                    "pair phones again.",
                )
        if state.phase != previous.phase:
            if state.phase == Phase.PUBLIC:
                self.notify.emit("LM Gate is public", state.public_url or "")
            elif state.phase == Phase.RECONNECTING:
                self.notify.emit("LM Gate is reconnecting", state.message)
            elif state.phase == Phase.ERROR:
                self.notify.emit("LM Gate could not go public", state.message)
        if state.upstream_note != previous.upstream_note and state.gateway_url:
            if state.upstream_note:
                self.notify.emit("LM Studio", state.upstream_note)
            elif previous.upstream_note:
                self.notify.emit("LM Studio answers again", "")
        if state.streams_in_one_piece and not previous.streams_in_one_piece:
            self.notify.emit("This tunnel does not stream", state.stream_note or "")
        if state.port_note and state.port_note != previous.port_note:
            self.notify.emit("LM Gate uses another port", state.port_note)
        if (
            (state.needs_lmstudio or state.needs_tunnel)
            and state.phase == Phase.PRIVATE
            and not self._guide_shown
        ):
            self._guide_shown = True
            self.show_guide()

    def _error(self, error: BaseException) -> None:
        self.last_error = str(error)
        self.notify.emit("LM Gate", self.last_error)
        if self.state.needs_tunnel or self.state.needs_lmstudio:
            self.show_guide()

    # ---- the actions ---------------------------------------------------------------------

    def go_public(self) -> None:
        if self.state.needs_tunnel:
            self.show_guide()
            return
        self.bridge.when_done(self.controller.go_public(), ignore, self._error)

    def go_private(self, revoke_devices: bool = False) -> None:
        self.bridge.when_done(self.controller.go_private(revoke_devices), ignore, self._error)

    def show_qr(self) -> None:
        if self.qr_window is None:
            self.qr_window = QrWindow(self.controller, self.bridge)
        self.qr_window.show()
        self.qr_window.raise_()
        self.qr_window.activateWindow()

    def _copied(self, text: str, what: str) -> None:
        QGuiApplication.clipboard().setText(text)
        self.notify.emit("Copied", what)

    def copy_public_url(self) -> None:
        url = self.state.public_url or self.state.gateway_url or ""
        self._copied(url, url)

    def copy_curl(self) -> None:
        self.bridge.when_done(
            self.controller.curl_snippet(),
            lambda snippet: self._copied(snippet, "curl snippet (its token lasts an hour)"),
            self._error,
        )

    def copy_openai_settings(self) -> None:
        def put(settings: tuple[str, str]) -> None:
            base_url, key = settings
            self._copied(
                f"OPENAI_BASE_URL={base_url}\nOPENAI_API_KEY={key}\n",
                "OpenAI settings: base URL and API key",
            )

        self.bridge.when_done(self.controller.openai_settings(), put, self._error)

    def show_devices(self) -> None:
        if self.devices_window is None:
            self.devices_window = DevicesWindow(self.controller, self.bridge)
        else:
            self.devices_window.refresh()
        self.devices_window.show()
        self.devices_window.raise_()

    def show_warm_up(self) -> None:
        if self.warm_up_window is None:
            self.warm_up_window = WarmUpWindow(self.controller, self.bridge)
            self.warm_up_window.said.connect(self.notify)
        self.warm_up_window.refresh()
        self.warm_up_window.show()  # non-modal: never exec()
        self.warm_up_window.raise_()

    def show_settings(self) -> None:
        if self.settings_window is None:
            self.settings_window = SettingsDialog(self.controller, self.bridge)
        self.settings_window.show()  # non-modal: never exec()
        self.settings_window.raise_()

    def show_guide(self) -> None:
        self.guide.explain(self.state)
        self.guide.show()
        self.guide.raise_()
        self.bridge.when_done(
            self.controller.tunnel_choices(),
            lambda rows: self.guide.explain(self.state, rows),
            self._error,
        )

    def choose_tunnel(self, provider: str) -> None:
        """Keep ``provider`` and go public with it (the guide's one click)."""
        self.guide.hide()
        self.bridge.when_done(self.controller.choose_tunnel(provider), ignore, self._error)

    def open_logs(self) -> bool:
        directory = log_dir()
        directory.mkdir(parents=True, exist_ok=True)
        return QDesktopServices.openUrl(QUrl.fromLocalFile(str(directory)))

    def quit(self) -> None:
        self._quit_app()
