"""Time, passed in so tests can control it (token expiry, rate limits, latencies)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (wall clock: for timestamps and expiry)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (for durations)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
