"""Honest fakes with their own tests (test_fakes.py)."""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when told to; wall and monotonic time advance together."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self._wall += seconds
        self._mono += seconds
