"""The tray icon, its menu (rebuilt from the current state every time it opens), and the small
window that stands in where no system tray exists (GNOME without AppIndicator)."""

from __future__ import annotations

import html

from PySide6.QtGui import QAction, QIcon
from PySide6.QtWidgets import QLabel, QMenu, QPushButton, QSystemTrayIcon, QVBoxLayout, QWidget

from tray_app.control.controller import AppState, Phase
from tray_app.ui.actions import AppActions
from tray_app.ui.icons import icon_for

# Marks the menu's lines that say how things are, not something to do: the main window
# turns every other action into a button.
STATUS_ONLY = "status"


def upstream_lines(state: AppState) -> list[str]:
    """One line per upstream ("desk: down: it refused LM Gate's token") when there are several;
    none for one, whose state the status line says already."""
    if len(state.upstreams) < 2:
        return []
    return [f"{status.name}: {status.words}" for status in state.upstreams]


def tooltip_for(state: AppState) -> str:
    where = state.public_url or state.gateway_url or ""
    return (
        f"LM Gate — {state.phase}"
        + (f": {where}" if where else "")
        + ("" if state.phase == Phase.PUBLIC else f"\n{state.message}")
        + (f"\n{state.stream_note}" if state.stream_note and state.phase == Phase.PUBLIC else "")
        + (f"\n{state.upstream_note}" if state.upstream_note else "")
        + "".join(f"\n{line}" for line in upstream_lines(state))
    )


def icon_name_for(state: AppState) -> str:
    """The icon's name: a running gateway whose LM Studio is off (or refuses its token)
    shows the reconnecting icon (blue), as a tunnel that reconnects does: up, but not answering."""
    if state.upstream_note and state.phase in {Phase.PRIVATE, Phase.PUBLIC}:
        return Phase.RECONNECTING
    return state.phase


class TrayMenu:
    """Builds the menu's actions from a state; shared by the tray and tests."""

    def __init__(self, actions: AppActions) -> None:
        self.actions = actions
        self.menu = QMenu()
        self.menu.aboutToShow.connect(self.rebuild)
        self.rebuild()

    def rebuild(self) -> None:
        state, do = self.actions.state, self.actions
        menu = self.menu
        menu.clear()
        status = menu.addAction(state.status_line)
        status.setEnabled(False)
        status.setData(STATUS_ONLY)
        lines = upstream_lines(state)
        if lines:
            menu.addSeparator()
        for line in lines:
            # "&&": a name or a reason with "&" must not become a keyboard mnemonic.
            shown = menu.addAction(line.replace("&", "&&"))
            shown.setEnabled(False)
            shown.setData(STATUS_ONLY)
        menu.addSeparator()
        public = state.phase in {Phase.PUBLIC, Phase.RECONNECTING}
        running = state.gateway_url is not None
        if public or (state.phase == Phase.STARTING and state.busy and running):
            menu.addAction("Go private", lambda: do.go_private(False))
            menu.addAction("Go private and revoke all devices", lambda: do.go_private(True))
        else:
            go = menu.addAction("Go public", do.go_public)
            go.setEnabled(running and not state.busy)
        qr = menu.addAction("Show QR code…", do.show_qr)
        qr.setEnabled(state.phase == Phase.PUBLIC)
        url = menu.addAction("Copy public URL", do.copy_public_url)
        url.setEnabled(state.phase == Phase.PUBLIC)
        curl = menu.addAction("Copy curl snippet", do.copy_curl)
        curl.setEnabled(running)
        openai = menu.addAction("Copy OpenAI settings", do.copy_openai_settings)
        openai.setEnabled(running)
        menu.addSeparator()
        # "&&": a single "&" would be taken for a keyboard mnemonic and vanish.
        menu.addAction("Devices && tokens…", do.show_devices).setEnabled(running)
        menu.addAction("Warm up a model…", do.show_warm_up).setEnabled(running)
        menu.addAction("Settings…", do.show_settings)
        menu.addAction("Open logs folder", do.open_logs)
        menu.addSeparator()
        menu.addAction("Quit", do.quit)

    def action(self, text: str) -> QAction:
        for action in self.menu.actions():
            if action.text().replace("&&", "&") == text:
                return action
        raise KeyError(text)

    @property
    def texts(self) -> list[str]:
        """The labels as people read them."""
        return [a.text().replace("&&", "&") for a in self.menu.actions() if not a.isSeparator()]


class Tray:
    def __init__(self, actions: AppActions) -> None:
        self.actions = actions
        self.menu = TrayMenu(actions)
        self.icon = QSystemTrayIcon()
        self.icon.setContextMenu(self.menu.menu)
        self.icon.activated.connect(self._activated)
        self.phase = ""
        actions.bridge.state_changed.connect(self.render)
        actions.notify.connect(self._notify)
        self.render(actions.state)
        self.icon.show()

    def render(self, state: AppState) -> None:
        name = icon_name_for(state)
        if name != self.phase:
            self.phase = name
            self.icon.setIcon(icon_for(name))
        self.icon.setToolTip(tooltip_for(state))

    def _notify(self, title: str, message: str) -> None:
        if QSystemTrayIcon.supportsMessages() and self.icon.isVisible():
            self.icon.showMessage(title, message, QSystemTrayIcon.MessageIcon.Information, 5000)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if (
            reason == QSystemTrayIcon.ActivationReason.Trigger
            and self.actions.state.phase == Phase.PUBLIC
        ):
            self.actions.show_qr()


class MainWindow(QWidget):
    """The same actions as the tray menu, as buttons: where no tray exists, and for a second
    launch to bring forward."""

    def __init__(self, actions: AppActions) -> None:
        super().__init__()
        self.app_actions = actions
        self.setWindowTitle("LM Gate")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # Where no tray shows messages, the window's own line says "Copied" and the like.
        self.feedback = QLabel("")
        self.feedback.setWordWrap(True)
        self.menu = TrayMenu(actions)
        self._layout = QVBoxLayout(self)
        self._layout.addWidget(self.status)
        self._layout.addWidget(self.feedback)
        actions.notify.connect(self._feedback)
        self.buttons: list[QPushButton] = []
        actions.bridge.state_changed.connect(self.show_state)
        self.show_state(actions.state)

    def _feedback(self, title: str, message: str) -> None:
        self.feedback.setText(f"{title}: {message}" if message else title)

    def show_state(self, state: AppState) -> None:
        self.setWindowIcon(QIcon(icon_for(icon_name_for(state), template=False)))
        self.status.setText(
            # The line and the notes may carry what an agent printed or a host it named:
            # text, never markup (boundary 7).
            f"<b>{state.phase.title()}</b> — {html.escape(state.status_line)}"
            + (f"<br><i>{html.escape(state.warning)}</i>" if state.warning else "")
            + (f"<br><i>{html.escape(state.port_note)}</i>" if state.port_note else "")
            + (f"<br>{html.escape(state.stream_note)}" if state.stream_note else "")
            # Names and reasons come from the config and other machines: escaped, not markup.
            + "".join(f"<br>{html.escape(line)}" for line in upstream_lines(state))
        )
        self.menu.rebuild()
        for button in self.buttons:
            self._layout.removeWidget(button)
            button.deleteLater()
        self.buttons = []
        for action in self.menu.menu.actions():
            if action.isSeparator() or action.data() == STATUS_ONLY:
                continue
            button = QPushButton(action.text())
            button.setEnabled(action.isEnabled())
            button.clicked.connect(action.trigger)
            self._layout.addWidget(button)
            self.buttons.append(button)
