"""``lmgate`` with no arguments: the tray app.

One instance per user: a second launch hands its wish (show, go public, show the QR code) to
the first over a local socket and exits. The icon appears at once; the core starts behind it on
its own loop thread.
"""

from __future__ import annotations

import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence

from PySide6.QtCore import QTimer
from PySide6.QtNetwork import QLocalServer, QLocalSocket
from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from tray_app.control.controller import AppState, Phase
from tray_app.ui.actions import AppActions
from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort
from tray_app.ui.stop_signals import StopSignals
from tray_app.ui.tray import MainWindow, Tray

log = logging.getLogger("lmgate.ui")


def instance_name() -> str:
    return f"lmgate-{getpass.getuser()}"


def send_to_running(messages: Sequence[str], name: str | None = None) -> bool:
    """Hand ``messages`` to a running instance; False if there is none."""
    socket = QLocalSocket()
    socket.connectToServer(name or instance_name())
    if not socket.waitForConnected(500):
        return False
    socket.write(("\n".join(messages) + "\n").encode())
    socket.flush()
    socket.waitForBytesWritten(1000)
    socket.disconnectFromServer()
    return True


class TrayApp:
    def __init__(
        self, controller: ControllerPort, *, quit_app: object = None, instance: str | None = None
    ) -> None:
        self.controller = controller
        self.bridge = UiBridge()
        controller.add_listener(self.bridge.publish_state)
        self.actions = AppActions(controller, self.bridge, self.quit)
        self.window = MainWindow(self.actions)
        self.tray: Tray | None = None
        if QSystemTrayIcon.isSystemTrayAvailable():
            self.tray = Tray(self.actions)
        else:
            self.window.show()  # no tray here: the window is the app
        self._show_qr_when_public = False
        self.bridge.state_changed.connect(self._maybe_show_qr)
        self.server = QLocalServer()
        name = instance or instance_name()
        QLocalServer.removeServer(name)  # a socket left by a crash
        self.server.listen(name)
        self.server.newConnection.connect(self._incoming)
        self._stopped = False
        # The orderly shutdown ran to its end: the exit is a clean one, whoever asked for it.
        self.stopped_in_order = False
        # Set by run(): a stop signal during Quit's shutdown then ends the app at once.
        self.stop_signals: StopSignals | None = None

    def start(self, wishes: Sequence[str] = ()) -> None:
        self.bridge.when_done(
            self.controller.start(), lambda _: self.handle(wishes), self.actions._error
        )

    def handle(self, wishes: Sequence[str]) -> None:
        for wish in wishes:
            if wish == "show":
                self.window.show()
                self.window.raise_()
                self.window.activateWindow()
            elif wish == "go-public":
                self.actions.go_public()
            elif wish == "quit":
                self.quit()
            elif wish == "show-qr":
                if self.actions.state.phase == Phase.PUBLIC:
                    self.actions.show_qr()
                else:
                    self._show_qr_when_public = True
                    self.actions.go_public()

    def _maybe_show_qr(self, state: AppState) -> None:
        if self._show_qr_when_public and state.phase == Phase.PUBLIC:
            self._show_qr_when_public = False
            self.actions.show_qr()

    def _incoming(self) -> None:
        while self.server.hasPendingConnections():
            connection = self.server.nextPendingConnection()

            def read(connection: QLocalSocket = connection) -> None:
                data = bytes(connection.readAll().data()).decode(errors="replace")
                self.handle([line for line in data.split() if line] or ["show"])

            connection.readyRead.connect(read)
            connection.disconnected.connect(connection.deleteLater)

    def quit(self) -> None:
        """Close windows, close the tunnel, let streams finish, stop the loop thread, exit."""
        if self._stopped:
            return
        self._stopped = True
        if self.stop_signals is not None:
            self.stop_signals.mark_stopping()
        if self.tray is not None:
            self.tray.icon.hide()
        for window in (
            self.window,
            self.actions.qr_window,
            self.actions.settings_window,
            self.actions.devices_window,
            self.actions.warm_up_window,
            self.actions.guide,
        ):
            if window is not None:
                window.close()
        try:
            self.server.close()
            self.controller.shutdown()
            self.stopped_in_order = True
        except Exception:
            # Still exit: an app left running with its windows closed could not be quit again.
            log.exception("the shutdown failed part way; exiting all the same")
        finally:
            app = QApplication.instance()
            if app is not None and self.stopped_in_order:
                app.quit()
            elif app is not None:
                app.exit(1)


def _application() -> QApplication:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    return app


def hand_to_running(wishes: Sequence[str] = ()) -> bool:
    """True when another tray runs and took ``wishes`` (or "show"): this launch is done.
    Asked before the core is built, so a second launch never opens what the first holds."""
    _application()
    if not send_to_running(list(wishes) or ["show"]):
        return False
    # Never a silent exit: the running tray may be on another session's screen.
    print(
        "lmgate: LM Gate already runs for this user (perhaps in another session); "
        "it was asked to " + _described(wishes) + ".",
        file=sys.stderr,
    )
    return True


def _described(wishes: Sequence[str]) -> str:
    said = {"go-public": "go public", "show-qr": "show its QR code", "quit": "quit"}
    return " and ".join(said.get(w, "show its window") for w in wishes) or "show its window"


def run(wishes: Sequence[str], controller: ControllerPort) -> int:
    """The tray around ``controller``, which the entry point built (the UI builds nothing of
    the core); it is started once the event loop runs, so the icon shows first."""
    app = _application()
    app.setQuitOnLastWindowClosed(False)
    app.setApplicationName("LM Gate")
    tray_app = TrayApp(controller)
    stop_signals = StopSignals(app, tray_app.quit, lambda signum: end_at_once(controller, signum))
    tray_app.stop_signals = stop_signals
    stop_signals.install()
    QTimer.singleShot(0, lambda: tray_app.start(wishes))
    # Quit from the menu, a stop signal, macOS's terminate request and Windows' session end
    # all come here.
    app.aboutToQuit.connect(tray_app.quit)
    try:
        code = int(app.exec())
    finally:
        stop_signals.uninstall()
    # Qt may end the loop with 1 when the X server goes away (an X11 session's end), after
    # aboutToQuit ran Quit: a shutdown that finished in order is the clean exit asked for.
    return 0 if tray_app.stopped_in_order else code


def end_at_once(controller: ControllerPort, signum: int) -> None:
    """A second stop signal: the running answers are not waited for, the tunnel's agent still
    stops (it runs in a session of its own, so no signal of ours reaches it). Never returns."""
    try:
        log.warning("%s during shutdown: ending at once", signal.Signals(signum).name)
        controller.stop_now()
    finally:
        logging.shutdown()
        # Not sys.exit: the handler may have interrupted the shutdown's wait in this thread,
        # and an exception would only unwind back into it.
        os._exit(128 + signum)
