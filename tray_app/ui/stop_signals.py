"""The tray's stop requests from outside: SIGTERM (what a desktop session sends at logout and
what `kill` sends), SIGINT, SIGHUP, and the desktop session's end. Each runs the same orderly
shutdown as Quit; a second one during it ends the app at once (what counts as second is
:class:`~tray_app.control.service.StopRequests`'s rule, which `serve` shares: a logout's
SIGTERM and SIGHUP, milliseconds apart, are one stop).

Python runs a signal handler only when the main thread executes Python code, and Qt's event
loop holds that thread in C++ for as long as nothing happens on screen. So the interpreter's
C-level handler also writes the signal to a socket (``signal.set_wakeup_fd``) that a
QSocketNotifier watches: the notifier's slot is the moment the Python handler runs.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from types import FrameType

from PySide6.QtCore import QObject, QSocketNotifier, QTimer
from PySide6.QtGui import QGuiApplication, QSessionManager

from tray_app.control.service import StopKind, StopRequests

# SIGHUP (a closed terminal) exists on POSIX only; Windows' session end comes through Qt.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)

Handler = Callable[[int, FrameType | None], object] | int | None


class StopSignals(QObject):
    """``orderly()`` runs once, from the event loop, at the first stop request; ``at_once(signum)``
    at a second signal (``requests`` decides which is one) — also while ``orderly`` still runs,
    since the handler interrupts whatever Python waits on in the main thread. ``at_once`` must
    end the process."""

    def __init__(
        self,
        app: QGuiApplication,
        orderly: Callable[[], None],
        at_once: Callable[[int], None],
        requests: StopRequests | None = None,
    ) -> None:
        super().__init__(app)
        self._app = app
        self._orderly = orderly
        self._at_once = at_once
        self._requests = requests or StopRequests()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._notifier = QSocketNotifier(self._reader.fileno(), QSocketNotifier.Type.Read, self)
        self._notifier.activated.connect(self._drain)
        self._previous: dict[signal.Signals, Handler] = {}
        self._previous_wakeup_fd: int | None = None

    @property
    def stopping(self) -> bool:
        return self._requests.stopping

    def install(self) -> None:
        """Take the stop signals and the session's end (main thread only, as Python requires)."""
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._writer.fileno(), warn_on_full_buffer=False
        )
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        # Windows' end-session message arrives as this and then aboutToQuit, macOS's terminate
        # request as aboutToQuit (which the app runs its Quit on); a platform plugin with
        # session management asks here too, and a session manager's mere checkpoint with it:
        # going private then is the safe mistake, never staying public with nobody watching.
        # Not X11: the xcb plugin Qt ships (6.11) has no XSMP, so this never fires there. An X11
        # logout stops the app by SIGTERM (and SIGHUP) from the session's manager. If the X
        # server goes away first, Qt mostly ends the process itself with C exit(1) ("The X11
        # connection broke", or Xlib's fatal IO error) before any Python runs: no orderly stop
        # then, and the agent is stopped only by the next start's PID-file check. Only when the
        # loss comes through aboutToQuit does Quit run (and run() make the exit 0).
        self._app.commitDataRequest.connect(self.session_ending)

    def uninstall(self) -> None:
        """Give the signals back to whoever had them (tests install and remove it often)."""
        self._app.commitDataRequest.disconnect(self.session_ending)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        signal.set_wakeup_fd(-1 if self._previous_wakeup_fd is None else self._previous_wakeup_fd)
        self._notifier.setEnabled(False)
        self._reader.close()
        self._writer.close()

    def mark_stopping(self) -> bool:
        """The orderly shutdown began (by Quit, or the session's end): a signal later ends it
        at once, unless it came with it (see StopRequests). True the first time."""
        return self._requests.begin()

    def request_stop(self) -> None:
        if self.mark_stopping():
            self._run_orderly()

    def _run_orderly(self) -> None:
        # From the event loop, never from inside whatever Python code the signal interrupted.
        QTimer.singleShot(0, self._orderly)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        kind = self._requests.signal(signum)
        if kind is StopKind.AT_ONCE:
            self._at_once(signum)
        elif kind is StopKind.ORDERLY:
            self._run_orderly()

    def session_ending(self, _manager: QSessionManager | None = None) -> None:
        """The desktop session ends (Qt's commitDataRequest): stop as on a first signal."""
        self.request_stop()

    def _drain(self) -> None:
        # The bytes only woke the loop; by now Python has run the handler for each signal.
        try:
            while self._reader.recv(64):
                pass
        except BlockingIOError:
            pass
