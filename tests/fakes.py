"""Honest fakes with their own tests (test_fakes.py)."""

from __future__ import annotations

from collections.abc import Callable


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


class FakeTunnelProvider:
    """A provider whose "public URL" is the local gateway itself; can be told to fail or to
    report itself lost, and counts what was asked of it."""

    name = "fake"
    warning: str | None = None
    # No agent dials in from loopback unless a test says so.
    forwarded_header: str | None = None

    def __init__(self, fail_opens: int = 0, url: str | None = None) -> None:
        self.fail_opens = fail_opens  # the next N opens raise TunnelError
        self.url = url
        self.opens = 0
        self.closes = 0
        self.is_open = False
        self._on_lost: Callable[[str], None] | None = None

    def set_lost_callback(self, callback: Callable[[str], None]) -> None:
        self._on_lost = callback

    async def open(self, local_port: int) -> str:
        from tray_app.errors import TunnelError

        self.opens += 1
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise TunnelError("fake provider refused to open")
        self.is_open = True
        return self.url or f"http://127.0.0.1:{local_port}"

    async def close(self) -> None:
        self.closes += 1
        self.is_open = False

    async def alive(self) -> bool:
        return self.is_open

    def lose(self, reason: str = "fake loss") -> None:
        """Simulate the provider noticing its session died (callable from any thread)."""
        self.is_open = False
        assert self._on_lost is not None
        self._on_lost(reason)
