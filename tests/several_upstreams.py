"""A gateway in front of several fake model servers, for the integration and security tests:
each server wants its own token, two callers (stickiness is per caller), metrics on."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from tests.fake_lmstudio import Behaviour, FakeLMStudio
from tray_app.config.settings import Config
from tray_app.config.upstreams import LOCAL, UpstreamEntry, token_secret_name
from tray_app.errors import AuthError
from tray_app.gateway.app import Gateway
from tray_app.gateway.metrics import GatewayMetrics
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.principal import ALL_SCOPES, Principal
from tray_app.secret_store.base import MemorySecretStore

KEYS = {
    "lmg_alice_" + secrets.token_urlsafe(24): "alice",
    "lmg_bob_" + secrets.token_urlsafe(24): "bob",
}
ALICE, BOB = list(KEYS)
NAMES = (LOCAL, "desk", "attic")


class KeysAuthenticator:
    """One principal per key: stickiness is per caller."""

    def __init__(self) -> None:
        self._principals = {
            key: Principal(name=name, scopes=ALL_SCOPES) for key, name in KEYS.items()
        }

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        given = headers.get("Authorization", "").removeprefix("Bearer ").encode()
        for key, principal in self._principals.items():
            if hmac.compare_digest(given, key.encode()):
                return principal
        raise AuthError("Invalid API key.", code="invalid_api_key")

    def still_valid(self, principal: Principal) -> bool:
        return True

    def check_state(self) -> None:
        pass  # no database behind it


class Rig:
    def __init__(
        self, fakes: list[FakeLMStudio], server: GatewayServer, store: MemorySecretStore
    ) -> None:
        self.fakes = fakes
        self.server = server
        self.store = store
        self.gateway = server.gateway

    @property
    def url(self) -> str:
        return self.server.url

    def states(self) -> dict[str, str]:
        return {v.name: v.state for v in self.gateway.upstream_views()}

    async def until(self, test: Callable[[], bool], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not test():
            assert time.monotonic() < deadline, f"never happened; upstreams: {self.states()}"
            await asyncio.sleep(0.02)

    async def all_up(self) -> None:
        await self.until(lambda: all(s == "up" for s in self.states().values()))

    def chats(self, index: int) -> int:
        return sum(p == "/v1/chat/completions" for p in self.fakes[index].paths)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def several() -> AsyncIterator[RigFactory]:
    started: list[FakeLMStudio] = []
    servers: list[GatewayServer] = []

    async def make(
        *behaviours: Behaviour,
        weights: tuple[int, ...] = (),
        enabled: tuple[bool, ...] = (),
        urls: Mapping[int, str] | None = None,
        stored: Mapping[str, str] | None = None,
        wait: bool = True,
        **settings: Any,
    ) -> Rig:
        """One fake per behaviour; ``urls`` puts another server in a fake's place (by index:
        the fake still runs, nothing is sent to it); ``stored``: more secret-store entries;
        ``wait``: until every upstream is up."""
        fakes = []
        tokens = {}
        for index, behaviour in enumerate(behaviours):
            # Each server wants its own token: a request with another's would be refused.
            token = behaviour.require_token = f"sk-{NAMES[index]}-" + secrets.token_urlsafe(16)
            tokens[token_secret_name(NAMES[index])] = token
            fake = FakeLMStudio(behaviour)
            await fake.start()
            started.append(fake)
            fakes.append(fake)
        entries = tuple(
            UpstreamEntry(
                NAMES[i],
                (urls or {}).get(i, fake.url),
                weight=(weights[i] if weights else 1),
                enabled=(enabled[i] if enabled else True),
            )
            for i, fake in enumerate(fakes)
        )
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("server_shutdown_grace", 1.0)
        config = Config(
            server_host="127.0.0.1",
            server_port=0,
            upstream_url=fakes[0].url,
            upstreams=entries,
            **settings,
        )
        store = MemorySecretStore({**tokens, **(stored or {})})
        gateway = Gateway(
            config,
            KeysAuthenticator(),
            secrets=store,
            metrics=GatewayMetrics(),
        )
        server = GatewayServer(gateway)
        await server.start()
        servers.append(server)
        rig = Rig(fakes, server, store)
        if wait:
            await rig.all_up()
        return rig

    yield make
    for server in servers:
        await server.stop()
    for fake in started:
        await fake.stop()


async def chat(rig: Rig, model: str, *, key: str = ALICE, stream: bool = False) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.post(
            rig.url + "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        if stream:
            return response.status, await response.text()
        return response.status, await response.json()


async def get(rig: Rig, path: str, key: str | None = ALICE) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(rig.url + path, headers=headers) as response,
    ):
        return response.status, await response.json()
