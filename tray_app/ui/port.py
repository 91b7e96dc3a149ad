"""What the UI needs from the core: ThreadedController's methods (a test double can stand in)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Protocol

from tray_app.control.controller import (
    MENU_OPENAI_SETTINGS,
    AppSettings,
    AppState,
    Credential,
    PairingLink,
)


class ControllerPort(Protocol):
    @property
    def state(self) -> AppState: ...

    def start(self) -> concurrent.futures.Future[AppState]: ...

    def add_listener(self, listener: Callable[[AppState], None]) -> None: ...

    def go_public(self) -> concurrent.futures.Future[AppState]: ...

    def go_private(self, revoke_devices: bool = False) -> concurrent.futures.Future[AppState]: ...

    def pairing_link(self) -> concurrent.futures.Future[PairingLink]: ...

    def curl_snippet(self) -> concurrent.futures.Future[str]: ...

    def openai_settings(
        self, purpose: str = MENU_OPENAI_SETTINGS
    ) -> concurrent.futures.Future[tuple[str, str]]: ...

    def test_connection(
        self, url: str, token: str | None = None
    ) -> concurrent.futures.Future[tuple[bool, list[str]]]: ...

    def credentials(self) -> concurrent.futures.Future[list[Credential]]: ...

    def revoke(self, kind: str, ident: str) -> concurrent.futures.Future[None]: ...

    def create_key(self, name: str, scopes: frozenset[str]) -> concurrent.futures.Future[str]: ...

    def settings(self) -> concurrent.futures.Future[AppSettings]: ...

    def save_settings(self, new: AppSettings) -> concurrent.futures.Future[AppState]: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...
