"""The one crossing between the loop thread and Qt's main thread.

The core calls listeners on its loop thread; here they become Qt signals, which Qt delivers on
the main thread (queued), so no QObject is ever touched from the loop thread. Results of
controller futures come back the same way.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from PySide6.QtCore import QObject, Qt, Signal, Slot

T = TypeVar("T")


class UiBridge(QObject):
    state_changed = Signal(object)  # a frozen AppState
    _call = Signal(object)  # a zero-argument callable to run on the UI thread

    def __init__(self) -> None:
        super().__init__()
        # Always queued, even from the UI thread itself: a result is handled on a later turn
        # of the event loop, never inside the code that asked for it.
        self._call.connect(self._run, Qt.ConnectionType.QueuedConnection)

    @Slot(object)
    def _run(self, function: Callable[[], None]) -> None:
        function()

    def publish_state(self, state: object) -> None:
        """Callable from any thread."""
        self.state_changed.emit(state)

    def when_done(
        self,
        future: concurrent.futures.Future[T],
        on_result: Callable[[T], None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Run ``on_result(value)`` (or ``on_error(exc)``) on the UI thread when ``future`` ends."""

        def finished(done: concurrent.futures.Future[T]) -> None:
            def deliver() -> None:
                if done.cancelled():
                    return
                error = done.exception()
                if error is None:
                    on_result(done.result())
                elif on_error is not None:
                    on_error(error)

            self._call.emit(deliver)

        future.add_done_callback(finished)


def ignore(_: Any) -> None:
    """A result nobody needs."""
