from __future__ import annotations

import os

# Qt tests run without a screen; must be set before any QApplication exists.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fake_lmstudio import FakeLMStudio, fake_on_a_thread
from tests.fakes import StaticKeyAuthenticator
from tests.helpers import Env, cli_env
from tray_app.clock import Clock, SystemClock
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, build_gateway, open_identity
from tray_app.control.loop_thread import LoopThread
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.principal import Authenticator
from tray_app.identity.signing_key import load_or_create_signing_key
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore

pytest_plugins = ["tests.redis_server", "tests.postgres_server"]  # real Redis and PostgreSQL

# Made fresh per run, so a test that finds one of these in a log found a real leak.
CLIENT_KEY = "lmg_test_" + secrets.token_urlsafe(24)
LMSTUDIO_TOKEN = "sk-lm-" + secrets.token_urlsafe(24)

GatewayFactory = Callable[..., Awaitable[GatewayServer]]


@pytest.fixture
async def fake_lmstudio() -> AsyncIterator[FakeLMStudio]:
    fake = FakeLMStudio()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_gateway(fake_lmstudio: FakeLMStudio) -> AsyncIterator[GatewayFactory]:
    """Start gateways on port 0 in front of the fake; settings as Config field overrides."""
    servers: list[GatewayServer] = []

    async def start(
        *,
        authenticator: Authenticator | None = None,
        lmstudio_token: str | None = LMSTUDIO_TOKEN,
        **settings: Any,
    ) -> GatewayServer:
        settings.setdefault("upstream_url", fake_lmstudio.url)
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("server_shutdown_grace", 1.0)
        config = Config(server_host="127.0.0.1", server_port=0, **settings)
        store = MemorySecretStore({LMSTUDIO_API_TOKEN: lmstudio_token} if lmstudio_token else {})
        gateway = Gateway(
            config, authenticator or StaticKeyAuthenticator(CLIENT_KEY), secrets=store
        )
        server = GatewayServer(gateway)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> GatewayServer:
    return await start_gateway()


@pytest.fixture
async def client(gateway: GatewayServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0
    ) as client:
        yield client


def auth_headers(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class IdentityRig:
    """A gateway with the full identity layer, its services, store and clock."""

    server: GatewayServer
    identity: Identity
    store: MemorySecretStore
    clock: Clock

    @property
    def url(self) -> str:
        return self.server.url


IdentityFactory = Callable[..., Awaitable[IdentityRig]]


@pytest.fixture
async def start_identity_gateway(
    fake_lmstudio: FakeLMStudio, tmp_path: Path
) -> AsyncIterator[IdentityFactory]:
    rigs: list[IdentityRig] = []

    async def start(*, clock: Clock | None = None, **settings: Any) -> IdentityRig:
        settings.setdefault("upstream_url", fake_lmstudio.url)
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("server_shutdown_grace", 1.0)
        settings.setdefault("storage_data_dir", str(tmp_path / f"data{len(rigs)}"))
        config = Config(server_host="127.0.0.1", server_port=0, **settings)
        clock = clock or SystemClock()
        store = MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})
        identity = open_identity(config, load_or_create_signing_key(store), clock=clock)
        server = GatewayServer(build_gateway(config, identity, store, clock=clock))
        await server.start()
        rig = IdentityRig(server, identity, store, clock)
        rigs.append(rig)
        return rig

    yield start
    for rig in rigs:
        await rig.server.stop()
        rig.identity.close()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return cli_env(tmp_path)


class LiveGateway:
    """The identity gateway and the fake LM Studio on their own loop thread, for synchronous
    tests (Playwright, subprocess clients) that cannot share pytest's event loop."""

    def __init__(self, data_dir: Path, clock: Clock | None = None, **settings: Any) -> None:
        self.thread = LoopThread()
        self.thread.start()
        self.fake = FakeLMStudio()
        self.thread.submit(self.fake.start()).result(5)
        settings.setdefault("streaming_heartbeat_interval", 0)
        config = Config(
            upstream_url=self.fake.url, server_port=0, storage_data_dir=str(data_dir), **settings
        )
        store = MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})
        self.identity = open_identity(config, load_or_create_signing_key(store))
        self.server = GatewayServer(build_gateway(config, self.identity, store, clock=clock))
        self.thread.submit(self.server.start()).result(5)

    def close(self) -> None:
        self.thread.submit(self.server.stop()).result(10)
        self.thread.submit(self.fake.stop()).result(5)
        self.thread.stop()
        self.identity.close()


@pytest.fixture
def lmstudio_thread() -> Iterator[FakeLMStudio]:
    """The fake LM Studio on a loop thread of its own (see :func:`fake_on_a_thread`)."""
    yield from fake_on_a_thread()
