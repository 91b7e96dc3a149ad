"""Who the client is: forwarding headers are believed only from the agent of the tunnel that is
running, so a local process cannot pick its address (to dodge the failed-login and pairing
throttles, or to lock someone else out), and a valid credential is never refused for others'
failures. Real sockets, the real gateway, ngrok's real code path with the fake agent, which
appends the client's address to X-Forwarded-For as the real one does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fakes import FakeTunnelProvider
from tests.helpers import FAKE_NGROK_AGENT, LogCapture
from tray_app.config.settings import Config, TunnelProvider
from tray_app.control.going_public import go_public, tunnel_manager
from tray_app.errors import TunnelError
from tray_app.tunnel.lan import LanProvider
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, NgrokProvider, silence_pyngrok_logs

AGENT = str(FAKE_NGROK_AGENT)
TOKEN = "2fakeAuthToken_" + "abc123XYZ" * 4
LIMIT = 3  # failures per minute per address, for both throttles
INTERNET_CLIENT = "203.0.113.7"  # where the fake agent says its client connected from
SPOOFED = "198.51.100.1"
WRONG_KEY = "lmg_" + "A" * 43
WRONG_CODE = "A" * 24


@dataclass(frozen=True)
class Throttle:
    """A throttled way to fail, and the matching way to succeed."""

    name: str
    fail_code: str
    throttled_code: str

    async def attempt(
        self, session: aiohttp.ClientSession, base: str, headers: dict[str, str], secret: str
    ) -> tuple[int, dict[str, object]]:
        if self.name == "auth":
            headers = {**headers, "Authorization": f"Bearer {secret}"}
            request = session.get(base + "/v1/models", headers=headers)
        else:
            body = {"code": secret, "device_name": "phone"}
            request = session.post(base + "/pair", json=body, headers=headers)
        async with request as response:
            return response.status, await response.json(content_type=None)

    def valid_secret(self, rig: IdentityRig) -> str:
        if self.name == "auth":
            return rig.identity.api_keys.create("owner", scopes=frozenset({"models"}))[0]
        return rig.identity.pairing.create_code()[0]

    @property
    def wrong_secret(self) -> str:
        return WRONG_KEY if self.name == "auth" else WRONG_CODE


THROTTLES = {
    "auth": Throttle("auth", "invalid_api_key", "too_many_auth_failures"),
    "pairing": Throttle("pairing", "pairing_code_invalid", "too_many_pairing_attempts"),
}

# Every way a caller might name "its" address; none is believed without a tunnel agent.
FORWARDING_HEADERS = {
    "X-Forwarded-For": lambda a: a,
    "X-Forwarded-For chain": lambda a: f"{a}, 10.0.0.1",
    "X-Real-IP": lambda a: a,
    "CF-Connecting-IP": lambda a: a,
    "True-Client-IP": lambda a: a,
    "Forwarded": lambda a: f"for={a}",
}


async def start(factory: IdentityFactory) -> IdentityRig:
    return await factory(
        limits_auth_failures_per_minute=LIMIT, limits_pairing_attempts_per_minute=LIMIT
    )


def clients(logs: LogCapture, path: str) -> list[str]:
    return [r["client"] for r in logs.access() if r["path"] == path]


def error_code(body: dict[str, object]) -> object:
    error = body.get("error")
    return error.get("code") if isinstance(error, dict) else None


async def fail_until_throttled(
    throttle: Throttle,
    session: aiohttp.ClientSession,
    base: str,
    headers: Callable[[int], dict[str, str]],
) -> None:
    """LIMIT refused attempts, then the next is throttled: all from one address."""
    for i in range(LIMIT):
        status, body = await throttle.attempt(session, base, headers(i), throttle.wrong_secret)
        assert (status, error_code(body)) == (401, throttle.fail_code), body
    status, body = await throttle.attempt(session, base, headers(LIMIT), throttle.wrong_secret)
    assert (status, error_code(body)) == (429, throttle.throttled_code), body


def path_of(throttle: Throttle) -> str:
    return "/v1/models" if throttle.name == "auth" else "/pair"


# ---- no tunnel: a local process cannot choose its address -------------------------------------


@pytest.mark.parametrize("throttle", THROTTLES.values(), ids=THROTTLES.keys())
@pytest.mark.parametrize(
    ("header", "value"), FORWARDING_HEADERS.items(), ids=FORWARDING_HEADERS.keys()
)
class TestWithoutATunnelNoHeaderIsBelieved:
    async def test_a_loopback_caller_is_127_0_0_1_whatever_it_claims(
        self,
        start_identity_gateway: IdentityFactory,
        throttle: Throttle,
        header: str,
        value: Callable[[str], str],
    ) -> None:
        rig = await start(start_identity_gateway)
        name = header.split(" ")[0]
        # A fresh "address" on every try: believed, it would dodge the throttle for ever.
        claims: Callable[[int], dict[str, str]] = lambda i: {  # noqa: E731
            name: value(f"203.0.113.{i + 1}")
        }
        with LogCapture() as logs:
            async with aiohttp.ClientSession() as session:
                await fail_until_throttled(throttle, session, rig.url, claims)
                # The throttle slows guessing; a valid secret from that address still works.
                status, body = await throttle.attempt(
                    session, rig.url, claims(99), throttle.valid_secret(rig)
                )
                assert status == 200, body
        assert set(clients(logs, path_of(throttle))) == {"127.0.0.1"}


# ---- a running ngrok tunnel: its agent is believed, and only while it runs ------------------


@pytest.fixture
async def ngrok_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[IdentityRig], Awaitable[TunnelManager]]]:
    monkeypatch.setenv("FAKE_NGROK_CLIENT_ADDRESS", INTERNET_CLIENT)
    silence_pyngrok_logs()
    managers: list[TunnelManager] = []

    async def open_tunnel(rig: IdentityRig) -> TunnelManager:
        rig.store.set(NGROK_AUTHTOKEN, TOKEN)
        config = Config(tunnel_provider=TunnelProvider.NGROK, tunnel_ngrok_path=AGENT)
        manager = await go_public(config, rig.server, rig.store, tmp_path / "state")
        managers.append(manager)
        return manager

    yield open_tunnel
    for manager in managers:
        await manager.stop()


@pytest.mark.parametrize("throttle", THROTTLES.values(), ids=THROTTLES.keys())
class TestThroughTheNgrokAgent:
    async def test_the_agents_address_is_believed_only_while_the_tunnel_runs(
        self,
        start_identity_gateway: IdentityFactory,
        ngrok_config: Callable[[IdentityRig], Awaitable[TunnelManager]],
        throttle: Throttle,
    ) -> None:
        rig = await start(start_identity_gateway)
        manager = await ngrok_config(rig)
        public = manager.status.public_url or ""
        assert public and public != rig.url
        # The client prepends a lie; the agent appends the truth, and the truth is used.
        spoof: Callable[[int], dict[str, str]] = lambda i: {"X-Forwarded-For": SPOOFED}  # noqa: E731
        with LogCapture() as logs:
            async with aiohttp.ClientSession() as session:
                await fail_until_throttled(throttle, session, public, spoof)
                via_tunnel = clients(logs, path_of(throttle))
                assert via_tunnel == [INTERNET_CLIENT] * (LIMIT + 1)
                # That internet client is throttled; this machine (another address) is not.
                status, body = await throttle.attempt(session, rig.url, {}, throttle.wrong_secret)
                assert (status, error_code(body)) == (401, throttle.fail_code), body
                # And the throttled client's valid secret still works.
                status, body = await throttle.attempt(
                    session, public, spoof(0), throttle.valid_secret(rig)
                )
                assert status == 200, body
                await manager.stop()
                # No tunnel, no agent to believe: the same claim from loopback is loopback's.
                before = len(logs.access())
                claim = {"X-Forwarded-For": INTERNET_CLIENT}
                status, body = await throttle.attempt(
                    session, rig.url, claim, throttle.wrong_secret
                )
                assert (status, error_code(body)) == (401, throttle.fail_code), body
        after = [r["client"] for r in logs.access()[before:] if r["path"] == path_of(throttle)]
        assert after == ["127.0.0.1"]


def test_providers_name_their_forwarding_header(tmp_path: Path) -> None:
    from tray_app.secret_store.base import MemorySecretStore
    from tray_app.tunnel.cloudflare import CloudflareProvider
    from tray_app.tunnel.tailscale import TailscaleProvider

    assert NgrokProvider(MemorySecretStore(), tmp_path).forwarded_header == "X-Forwarded-For"
    for named in (False, True):
        cloudflare = CloudflareProvider(MemorySecretStore(), tmp_path, named=named)
        assert cloudflare.forwarded_header == "CF-Connecting-IP"
    for funnel in (False, True):
        tailscale = TailscaleProvider(tmp_path, funnel=funnel)
        assert tailscale.forwarded_header == "X-Forwarded-For"
    assert LanProvider.forwarded_header is None


async def test_lan_mode_believes_no_header(start_identity_gateway: IdentityFactory) -> None:
    rig = await start(start_identity_gateway)
    manager = await go_public(
        Config(tunnel_provider=TunnelProvider.LAN, tunnel_lan_address="127.0.0.2"),
        rig.server,
        rig.store,
        Path("/x"),
    )
    lan = manager.status.public_url or ""
    try:
        with LogCapture() as logs:
            async with aiohttp.ClientSession() as session:
                await THROTTLES["auth"].attempt(
                    session, rig.url, {"X-Forwarded-For": SPOOFED}, WRONG_KEY
                )
            # A device on the LAN (127.0.0.2 plays one) connects directly.
            device = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=device) as session:
                await THROTTLES["auth"].attempt(
                    session, lan, {"X-Forwarded-For": SPOOFED}, WRONG_KEY
                )
    finally:
        await manager.stop()
    assert clients(logs, "/v1/models") == ["127.0.0.1", "127.0.0.2"]


# ---- every change of the tunnel's state reaches the gateway --------------------------------


class Recorder:
    def __init__(self) -> None:
        self.states: list[TunnelStatus] = []

    def __call__(self, status: TunnelStatus) -> None:
        self.states.append(status)

    async def reach(self, state: TunnelState, count: int = 1, attempt: int = 0) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = [s for s in self.states if s.state is state and s.attempt >= attempt]
            if len(seen) >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never reached {state}; saw {[s.state for s in self.states]}")


async def who_am_i(rig: IdentityRig, logs: LogCapture) -> str:
    """The client address the gateway gives a loopback caller that claims INTERNET_CLIENT."""
    before = len(logs.access())
    async with (
        aiohttp.ClientSession() as session,
        session.get(rig.url + "/healthz", headers={"X-Forwarded-For": INTERNET_CLIENT}),
    ):
        pass
    return str(logs.access()[before:][-1]["client"])


async def status_as(host: str, port: int, path: str) -> int:
    """The status of GET ``path`` addressed to ``host``, as a tunnel's edge relays it (a raw
    socket: a client library would address the request to where it connects)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n")[0]
    finally:
        writer.close()
        await writer.wait_closed()
    return int(head.split()[1])


async def test_reconnecting_and_stopping_withdraw_the_trust(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start(start_identity_gateway)
    provider = FakeTunnelProvider()
    provider.forwarded_header = "X-Forwarded-For"  # as if its agent dialled in from loopback
    recorder = Recorder()
    manager = tunnel_manager(
        provider, rig.server, recorder, health_interval=60, backoff_start=0.05, backoff_max=0.05
    )
    with LogCapture() as logs:
        assert await who_am_i(rig, logs) == "127.0.0.1"
        await manager.start()
        assert await who_am_i(rig, logs) == INTERNET_CLIENT
        provider.fail_opens = 1_000
        provider.lose("session closed")
        await recorder.reach(TunnelState.RECONNECTING, attempt=2)
        assert await who_am_i(rig, logs) == "127.0.0.1", "no agent runs while reconnecting"
        provider.fail_opens = 0
        await recorder.reach(TunnelState.PUBLIC, count=2)
        assert await who_am_i(rig, logs) == INTERNET_CLIENT
        await manager.stop()
        assert await who_am_i(rig, logs) == "127.0.0.1"


async def test_an_unproven_url_leaves_nothing_trusted(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start(start_identity_gateway)
    provider = FakeTunnelProvider()
    provider.forwarded_header = "X-Forwarded-For"

    async def never_works(url: str) -> bool:
        return False

    manager = tunnel_manager(provider, rig.server, checker=never_works, verify_timeout=0.2)
    with LogCapture() as logs:
        with pytest.raises(TunnelError, match="could not reach itself"):
            await manager.start()
        assert manager.status.state is TunnelState.FAILED
        assert await who_am_i(rig, logs) == "127.0.0.1"


async def test_the_public_host_is_served_only_while_the_tunnel_runs(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start(start_identity_gateway)
    port = rig.server.port or 0
    host = "calm-otter.ngrok-free.app"
    provider = FakeTunnelProvider(url=f"https://{host}")
    provider.forwarded_header = "X-Forwarded-For"

    async def through_the_edge(url: str) -> bool:
        return await status_as(urlsplit(url).netloc, port, "/healthz") == 200

    assert await status_as(host, port, "/v1/models") == 421
    manager = tunnel_manager(provider, rig.server, checker=through_the_edge, verify_timeout=2)
    status = await manager.start()
    assert (status.state, status.public_url) == (TunnelState.PUBLIC, f"https://{host}")
    assert await status_as(host, port, "/v1/models") == 401  # served: it asks for a key
    await manager.stop()
    assert await status_as(host, port, "/v1/models") == 421
