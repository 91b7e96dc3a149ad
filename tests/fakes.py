"""Honest fakes with their own tests (test_fakes.py)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

from tray_app.errors import AuthError
from tray_app.identity.principal import (
    ALL_SCOPES,
    MISSING_CREDENTIAL,
    Principal,
    extract_credential,
)


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


MIN_KEY_LENGTH = 16


class StaticKeyAuthenticator:
    """One shared key with every scope, compared in constant time: for gateway tests that
    are about something other than identity."""

    def __init__(self, key: str, *, principal_name: str = "owner") -> None:
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"the API key must be at least {MIN_KEY_LENGTH} characters")
        self._key = key.encode("utf-8")
        self._principal = Principal(name=principal_name, scopes=ALL_SCOPES)

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        credential = extract_credential(headers)
        if credential is None:
            raise AuthError(MISSING_CREDENTIAL, code="missing_api_key")
        if not hmac.compare_digest(credential.encode("utf-8"), self._key):
            raise AuthError("Invalid API key.", code="invalid_api_key")
        return self._principal

    def still_valid(self, principal: Principal) -> bool:
        return principal is self._principal

    def check_state(self) -> None:
        pass  # no database behind it
