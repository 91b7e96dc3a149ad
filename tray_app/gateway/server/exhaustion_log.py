"""One log line per kind of trouble every few seconds, however often the trouble happens.

A flood of refused connections, or a listener that cannot accept because the process is out of
descriptors, happens hundreds of times a second; asyncio logs the latter with a traceback each
time, which once grew the log by tens of megabytes in seconds. Here the first occurrence is
logged at once, later ones within ``interval`` are only counted, and the count goes out in one
summary line when the interval ends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("lmgate.connections")

DEFAULT_INTERVAL = 5.0
# The message asyncio's selector loop passes to the exception handler when accept() fails.
ACCEPT_EXHAUSTED = "socket.accept() out of system resource"

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


@dataclass(slots=True)
class _Kind:
    last: float
    suppressed: int = 0
    latest: tuple[str, tuple[object, ...]] = ("", ())
    flush: asyncio.TimerHandle | None = None


class RateLimitedLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval: float | None = None) -> None:
        self._loop = loop
        self.interval = DEFAULT_INTERVAL if interval is None else interval
        self._kinds: dict[str, _Kind] = {}

    def note(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` now, or count it if ``kind`` was logged within the interval.

        Formatting waits until a line is written: under a flood most calls only count."""
        now = self._loop.time()
        state = self._kinds.get(kind)
        if state is None or (state.flush is None and now - state.last >= self.interval):
            log.warning(message, *args)
            self._kinds[kind] = _Kind(last=now)
            return
        state.suppressed += 1
        state.latest = (message, args)
        if state.flush is None:
            state.flush = self._loop.call_at(state.last + self.interval, self._flush, kind)

    def _flush(self, kind: str) -> None:
        state = self._kinds[kind]
        state.flush = None
        if not state.suppressed:
            return
        message, args = state.latest
        log.warning(
            message + " (%d more like this in the last %g s)",
            *args,
            state.suppressed,
            self.interval,
        )
        state.suppressed = 0
        state.last = self._loop.time()

    def close(self) -> None:
        """Write the counts still pending, so a stop does not hide them."""
        for kind, state in list(self._kinds.items()):
            if state.flush is not None:
                state.flush.cancel()
                self._flush(kind)


class AcceptErrorFilter:
    """The event loop's exception handler while a gateway runs: accept() failures for want of
    descriptors or memory become rate-limited lines; everything else goes to the handler that
    was there before."""

    def __init__(self, exhaustion: RateLimitedLog) -> None:
        self._exhaustion = exhaustion
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: ExceptionHandler | None = None
        self._active = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._active = True
        loop.set_exception_handler(self.handle)

    def uninstall(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.get_exception_handler() == self.handle:
            loop.set_exception_handler(self._previous)
        else:
            # Someone installed a handler after us and calls us in turn: step aside without
            # taking theirs away.
            self._active = False

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if self._active and context.get("message") == ACCEPT_EXHAUSTED and isinstance(exc, OSError):
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self._exhaustion.note(
                "accept",
                "cannot accept connections: %s (%s); asyncio retries in a second",
                exc.strerror,
                name,
            )
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)
