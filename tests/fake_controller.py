"""A controller double for UI tests: answers at once, records every call, and publishes
states on demand. Its own tests are in test_fake_controller.py."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from tray_app.control.controller import AppSettings, AppState, Credential, PairingLink, Phase
from tray_app.control.tunnel_setup import ChoiceRow
from tray_app.tunnel.choices import CHOICES

T = TypeVar("T")

PUBLIC_URL = "https://calm-otter-42.ngrok-free.app"


def done(value: T) -> concurrent.futures.Future[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return future


def failed(error: BaseException) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_exception(error)
    return future


class FakeController:
    def __init__(self, state: AppState | None = None) -> None:
        self._state = state or AppState(
            phase=Phase.PRIVATE,
            gateway_url="http://127.0.0.1:8787",
            message="Private: only this computer can connect",
            lmstudio_reachable=True,
            provider="ngrok",
        )
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.listeners: list[Callable[[AppState], None]] = []
        self.codes = 0
        self.fail_next: BaseException | None = None
        self.clock: Callable[[], float] = time.time
        self.stored_settings = AppSettings(
            upstream_url="http://127.0.0.1:1234",
            tunnel_provider="ngrok",
            tunnel_ngrok_domain="",
            auth_allowed_models=(),
            auth_token_ttl=86400.0,
            limits_requests_per_minute=120,
            limits_concurrent_requests=4,
            tunnel_go_public_at_start=False,
            start_at_login=False,
            lmstudio_token_set=False,
            ngrok_token_set=True,
        )

    @property
    def state(self) -> AppState:
        return self._state

    def publish(self, **changes: Any) -> AppState:
        self._state = replace(self._state, **changes)
        for listener in self.listeners:
            listener(self._state)
        return self._state

    def _answer(self, name: str, value: T, *args: Any) -> concurrent.futures.Future[T]:
        self.calls.append((name, args))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return failed(error)
        return done(value)

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]

    def add_listener(self, listener: Callable[[AppState], None]) -> None:
        self.listeners.append(listener)

    def start(self) -> concurrent.futures.Future[AppState]:
        return self._answer("start", self.publish())

    def go_public(self) -> concurrent.futures.Future[AppState]:
        return self._answer("go_public", self.publish(phase=Phase.PUBLIC, public_url=PUBLIC_URL))

    def go_private(self, revoke_devices: bool = False) -> concurrent.futures.Future[AppState]:
        return self._answer(
            "go_private", self.publish(phase=Phase.PRIVATE, public_url=None), revoke_devices
        )

    def pairing_link(self) -> concurrent.futures.Future[PairingLink]:
        self.codes += 1
        code = f"{self.codes:0>24}".replace("0", "A").replace("1", "B")[:24]
        base = self._state.public_url or self._state.gateway_url or ""
        return self._answer(
            "pairing_link", PairingLink(f"{base}/#{code}", code, self.clock() + 600)
        )

    def curl_snippet(self) -> concurrent.futures.Future[str]:
        return self._answer("curl_snippet", "curl -N https://example/v1/chat/completions\n")

    def models(self) -> concurrent.futures.Future[list[str]]:
        return self._answer("models", ["qwen2.5-7b-instruct", "llama-3.2-1b"])

    def warm_up(self, model: str) -> concurrent.futures.Future[float]:
        return self._answer("warm_up", 1.5, model)

    def openai_settings(
        self, purpose: str = "openai-settings"
    ) -> concurrent.futures.Future[tuple[str, str]]:
        base = (self._state.public_url or self._state.gateway_url or "") + "/v1"
        return self._answer("openai_settings", (base, "lmg_fake_app_key"), purpose)

    def test_connection(
        self, url: str, token: str | None = None
    ) -> concurrent.futures.Future[tuple[bool, list[str]]]:
        return self._answer(
            "test_connection", (True, ["qwen2.5-7b-instruct", "llama-3.2-1b"]), url, token
        )

    def credentials(self) -> concurrent.futures.Future[list[Credential]]:
        return self._answer(
            "credentials",
            [
                Credential(
                    "device", "d1", "Pixel", "paired device", 1.8e9, 1.8e9 + 60, 12, 3400, True
                ),
                Credential("key", "k1", "laptop", "chat models", 1.8e9, None, 0, 0, True),
            ],
        )

    def revoke(self, kind: str, ident: str) -> concurrent.futures.Future[None]:
        return self._answer("revoke", None, kind, ident)

    def create_key(self, name: str, scopes: frozenset[str]) -> concurrent.futures.Future[str]:
        return self._answer("create_key", "lmg_new_key_for_" + name.replace(" ", "_"), name, scopes)

    def settings(self) -> concurrent.futures.Future[AppSettings]:
        return self._answer("settings", self.stored_settings)

    def save_settings(self, new: AppSettings) -> concurrent.futures.Future[AppState]:
        self.stored_settings = replace(
            new,
            new_lmstudio_token=None,
            new_ngrok_token=None,
            new_cloudflare_token=None,
            ngrok_token_set=new.ngrok_token_set or bool(new.new_ngrok_token),
            cloudflare_token_set=new.cloudflare_token_set or bool(new.new_cloudflare_token),
        )
        return self._answer("save_settings", self._state, new)

    def tunnel_choices(self) -> concurrent.futures.Future[tuple[ChoiceRow, ...]]:
        # cloudflared "installed", the others not: the guide's one-click choice shows.
        rows = tuple(
            ChoiceRow(choice, choice.program in {None, "cloudflared"}) for choice in CHOICES
        )
        return self._answer("tunnel_choices", rows)

    def ngrok_install_plan(self) -> concurrent.futures.Future[tuple[str, str]]:
        plan = ("https://bin.example/ngrok-v3-stable-linux-amd64.tgz", "/home/me/.config/ngrok")
        return self._answer("ngrok_install_plan", plan)

    def install_ngrok_agent(self) -> concurrent.futures.Future[str]:
        return self._answer("install_ngrok_agent", "Installed ngrok 3.19.1 at /home/me/ngrok.")

    def choose_tunnel(self, provider: str) -> concurrent.futures.Future[AppState]:
        self.stored_settings = replace(self.stored_settings, tunnel_provider=provider)
        return self._answer("choose_tunnel", self._state, provider)

    def stop_now(self) -> None:
        self.calls.append(("stop_now", ()))

    def shutdown(self, timeout: float = 30.0) -> None:
        self.calls.append(("shutdown", ()))
