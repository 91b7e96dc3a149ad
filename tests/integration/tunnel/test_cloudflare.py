"""Cloudflare tunnels through the provider's real code path, a real gateway with FakeLMStudio and
the fake agent in tests/fake_cloudflared (which serves cloudflared's metrics endpoints and really
forwards TCP, setting CF-Connecting-IP as Cloudflare does). Everything stays on loopback; the
fake serves plain HTTP, so the provider is given scheme "http"."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import LogCapture, free_port
from tray_app.control.going_public import tunnel_manager
from tray_app.errors import TunnelError
from tray_app.secret_store.base import MemorySecretStore
from tray_app.tunnel.cloudflare import (
    CLOUDFLARE_TUNNEL_TOKEN,
    QUICK_WARNING,
    CloudflareProvider,
)
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus

AGENT = str(Path(__file__).resolve().parents[2] / "fake_cloudflared" / "cloudflared")
SECRET = base64.b64encode(bytes(range(7, 39))).decode()
TOKEN = base64.b64encode(
    json.dumps(
        {"a": "0123456789abcdef0123456789abcdef", "t": "6d2f1c3a-0b8e-4c21-9f3e", "s": SECRET}
    ).encode()
).decode()
INVALID = base64.b64encode(
    json.dumps({"a": "0123456789abcdef", "t": "invalid-tunnel", "s": SECRET}).encode()
).decode()
INTERNET_CLIENT = "203.0.113.7"  # where the fake agent says its client connected from
SPOOFED = "198.51.100.1"
LIMIT = 3
WRONG_KEY = "lmg_" + "A" * 43


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except FileNotFoundError:
        return False


class Recorder:
    def __init__(self) -> None:
        self.states: list[TunnelStatus] = []

    def __call__(self, status: TunnelStatus) -> None:
        self.states.append(status)

    @property
    def names(self) -> list[str]:
        """The states in order, a repeat in a row once (a status may be re-published with
        more detail, e.g. the stream check's result)."""
        names: list[str] = []
        for status in self.states:
            if not names or names[-1] != status.state.value:
                names.append(status.state.value)
        return names

    async def reach_after(
        self, first: TunnelState, then: TunnelState, timeout: float = 20
    ) -> TunnelStatus:
        """The first ``then`` status published after the first ``first`` status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = list(self.states)
            starts = [i for i, s in enumerate(states) if s.state is first]
            if starts:
                later = [s for s in states[starts[0] + 1 :] if s.state is then]
                if later:
                    return later[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"never reached {then} after {first}; saw {self.names}")

    async def reach(self, state: TunnelState, count: int = 1, timeout: float = 20) -> TunnelStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [s for s in self.states if s.state is state]
            if len(seen) >= count:
                return seen[-1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"never reached {state} x{count}; saw {self.names}")


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "agent-record.jsonl"
    monkeypatch.setenv("FAKE_CLOUDFLARED_RECORD", str(path))
    monkeypatch.setenv("FAKE_CLOUDFLARED_CLIENT_ADDRESS", INTERNET_CLIENT)
    return path


def entries(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


# The fake's quick tunnel is a loopback port; the real one a trycloudflare.com name (the
# default pattern, which refuses the fake's: test_a_quick_tunnel_name_that_is_not_cloudflares…).
FAKE_QUICK_HOST = re.compile(r"127\.0\.0\.1:\d+")


def quick(tmp_path: Path, **options: Any) -> CloudflareProvider:
    options.setdefault("open_timeout", 15)
    options.setdefault("quick_host", FAKE_QUICK_HOST)
    return CloudflareProvider(
        MemorySecretStore(),
        tmp_path / "state" / "cloudflare",
        agent_path=AGENT,
        scheme="http",
        **options,
    )


def named(
    tmp_path: Path, token: str | None = TOKEN, hostname: str = "", **options: Any
) -> CloudflareProvider:
    store = MemorySecretStore({CLOUDFLARE_TUNNEL_TOKEN: token} if token is not None else {})
    options.setdefault("open_timeout", 15)
    return CloudflareProvider(
        store,
        tmp_path / "state" / "cloudflare",
        named=True,
        agent_path=AGENT,
        hostname=hostname,
        scheme="http",
        **options,
    )


@pytest.fixture
async def providers() -> AsyncIterator[list[CloudflareProvider]]:
    made: list[CloudflareProvider] = []
    yield made
    for provider in made:
        await provider.close()


async def access_lines(logs: LogCapture, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    """The access lines once there are ``count`` (a line is written after the answer's last byte
    went out, so a client can hold the answer first); waits without blocking the loop."""
    deadline = time.monotonic() + timeout
    while len(lines := logs.access()) < count:
        assert time.monotonic() < deadline, f"{len(lines)} access lines, wanted {count}"
        await asyncio.sleep(0.02)
    return lines


async def key_for(rig: IdentityRig) -> str:
    return rig.identity.api_keys.create("phone", scopes=frozenset({"chat", "models"}))[0]


async def chat_and_stream(url: str, key: str, fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 6
    headers = {"CF-Connecting-IP": SPOOFED}  # a client's lie: the agent replaces it
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, default_headers=headers
    ) as client:
        answer = await client.chat.completions.create(
            model=MODELS[0], messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
        stream = await client.chat.completions.create(
            model=MODELS[0], stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == "".join(f"tok{i} " for i in range(6))


# ---- quick tunnels ---------------------------------------------------------------------------


async def test_quick_tunnel_end_to_end_with_the_openai_client(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
) -> None:
    rig = await start_identity_gateway()
    key = await key_for(rig)
    provider = quick(tmp_path)
    providers.append(provider)
    recorder = Recorder()
    manager = tunnel_manager(provider, rig.server, recorder)
    with LogCapture() as logs:
        status = await manager.start()
        url = status.public_url or ""
        # The URL the agent's metrics server named (the fake's edge port), not the gateway's.
        assert url.startswith("http://127.0.0.1:") and url != rig.url
        assert status.warning == QUICK_WARNING and "no uptime promise" in QUICK_WARNING
        assert provider.name == "cloudflare-quick"
        pid = provider.agent_pid
        assert pid is not None and pid_alive(pid)
        await chat_and_stream(url, key, fake_lmstudio)
        lines = await access_lines(logs, 3)
        await manager.stop()
    # The URL was proven through the tunnel first; every call names the internet client.
    assert (lines[0]["path"], lines[0]["status"]) == ("/healthz", 200)
    chats = [r for r in lines if r["path"] == "/v1/chat/completions"]
    assert [r["client"] for r in chats] == [INTERNET_CLIENT, INTERNET_CLIENT]
    assert recorder.names == ["starting", "public", "stopped"]
    (start,) = entries(record)
    argv = start["argv"]
    assert argv[:2] == ["--no-autoupdate", "--config"]
    assert argv[2] == str(provider.config_path)
    assert argv[argv.index("--metrics") + 1].startswith("127.0.0.1:")
    assert argv[argv.index("--url") + 1] == f"http://127.0.0.1:{rig.server.port}"
    assert "run" not in argv
    assert start["config_mode"] == "0o600"
    assert (provider.config_path.parent.stat().st_mode & 0o777) == 0o700
    # Closed: no agent, no PID file, no config file.
    assert not pid_alive(pid)
    assert not provider.pid_path.exists() and not provider.config_path.exists()


async def test_a_buffering_tunnel_still_streams_the_whole_answer(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_BUFFER", "1")
    rig = await start_identity_gateway()
    provider = quick(tmp_path)
    providers.append(provider)
    manager = tunnel_manager(provider, rig.server)
    status = await manager.start()
    try:
        await chat_and_stream(status.public_url or "", await key_for(rig), fake_lmstudio)
    finally:
        await manager.stop()


async def test_cf_connecting_ip_is_believed_only_from_the_running_agent(
    start_identity_gateway: IdentityFactory,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
) -> None:
    rig = await start_identity_gateway(
        limits_auth_failures_per_minute=LIMIT, limits_pairing_attempts_per_minute=LIMIT
    )
    provider = quick(tmp_path)
    providers.append(provider)
    manager = tunnel_manager(provider, rig.server)
    assert provider.forwarded_header == "CF-Connecting-IP"

    async def attempt(session: aiohttp.ClientSession, base: str, claim: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {WRONG_KEY}", "CF-Connecting-IP": claim}
        async with session.get(base + "/v1/models", headers=headers) as response:
            body = await response.json(content_type=None)
            return response.status, body["error"]["code"]

    with LogCapture() as logs:
        async with aiohttp.ClientSession() as session:
            # No tunnel: straight to the gateway from loopback, the forged header is nobody.
            assert await attempt(session, rig.url, INTERNET_CLIENT) == (401, "invalid_api_key")
            status = await manager.start()
            public = status.public_url or ""
            # Through the tunnel: each client lie is replaced by the agent's one address.
            for i in range(LIMIT):
                assert await attempt(session, public, f"198.51.100.{i + 1}") == (
                    401,
                    "invalid_api_key",
                )
            assert await attempt(session, public, SPOOFED) == (429, "too_many_auth_failures")
            await manager.stop()
            # Stopped: the same claim from loopback is loopback's again.
            assert await attempt(session, rig.url, INTERNET_CLIENT) == (401, "invalid_api_key")
        lines = await access_lines(logs, LIMIT + 4)
    clients = [r["client"] for r in lines if r["path"] == "/v1/models"]
    assert clients == ["127.0.0.1", *[INTERNET_CLIENT] * (LIMIT + 1), "127.0.0.1"]


async def test_quick_mode_strips_an_inherited_tunnel_token(
    start_identity_gateway: IdentityFactory,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Someone's named tunnel in the user's shell must not capture a quick tunnel.
    monkeypatch.setenv("TUNNEL_TOKEN", TOKEN)
    monkeypatch.setenv("TUNNEL_ORIGIN_CERT", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("FAKE_CLOUDFLARED_EXPECT_TOKEN", TOKEN)
    rig = await start_identity_gateway()
    provider = quick(tmp_path)
    providers.append(provider)
    manager = tunnel_manager(provider, rig.server)
    await manager.start()
    await manager.stop()
    (start,) = entries(record)
    assert (start["token_in_env"], start["tunnel_env"]) == (False, [])
    assert "--url" in start["argv"]


async def test_loop_never_waits_on_the_agent(
    start_identity_gateway: IdentityFactory,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_READY_DELAY", "1.5")
    rig = await start_identity_gateway()
    provider = quick(tmp_path)
    providers.append(provider)
    manager = tunnel_manager(provider, rig.server)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while len(gaps) < 30:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    await asyncio.gather(manager.start(), ticker())
    await manager.stop()
    assert max(gaps) < 0.3, f"the loop stalled for {max(gaps):.2f} s"


# ---- named tunnels and the token ---------------------------------------------------------------


async def test_named_tunnel_token_only_in_the_environment_never_in_argv_logs_or_files(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = await start_identity_gateway()
    edge = free_port()
    monkeypatch.setenv("FAKE_CLOUDFLARED_PUBLIC_PORT", str(edge))
    monkeypatch.setenv("FAKE_CLOUDFLARED_ORIGIN", f"http://127.0.0.1:{rig.server.port}")
    monkeypatch.setenv("FAKE_CLOUDFLARED_EXPECT_TOKEN", TOKEN)
    # A careless agent line naming the token, once whole and once split across reads.
    monkeypatch.setenv("FAKE_CLOUDFLARED_ECHO_TOKEN", "1")
    monkeypatch.setenv("TUNNEL_TOKEN", "someone-elses-token")  # replaced by ours
    provider = named(tmp_path, hostname=f"127.0.0.1:{edge}")
    providers.append(provider)
    assert (provider.name, provider.warning) == ("cloudflare-named", None)
    recorder = Recorder()
    manager = tunnel_manager(provider, rig.server, recorder)
    with LogCapture() as logs:
        status = await manager.start()
        assert status.public_url == f"http://127.0.0.1:{edge}"
        pid = provider.agent_pid
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert TOKEN not in argv and "--token" not in argv and " run" in argv.replace("\0", " ")
        await chat_and_stream(status.public_url or "", await key_for(rig), fake_lmstudio)
        tail = "\n".join(provider._agent.tail())
        await manager.stop()
    (start,) = entries(record)
    assert (start["token_in_env"], start["token_matches"]) == (True, True)
    assert start["tunnel_env"] == ["TUNNEL_TOKEN"]
    assert start["argv"][-1] == "run"
    text = logs.text
    assert "[token]" in text, "the agent's lines were logged, redacted"
    for where in (text, tail):
        assert TOKEN not in where and SECRET not in where
        assert not [TOKEN[i : i + 12] for i in range(len(TOKEN) - 11) if TOKEN[i : i + 12] in where]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            content = path.read_text(errors="replace")
            assert TOKEN not in content and SECRET not in content, path
    assert not provider.pid_path.exists() and not provider.config_path.exists()
    assert not pid_alive(pid)


# ---- errors people hit: one sentence each --------------------------------------------------------


async def open_fails(provider: CloudflareProvider, port: int = 0) -> str:
    with pytest.raises(TunnelError) as caught:
        await provider.open(port or free_port())
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    assert provider.agent_pid is None
    assert not provider.pid_path.exists() and not provider.config_path.exists()
    return message


async def test_a_missing_token_says_how_to_get_one(record: Path, tmp_path: Path) -> None:
    message = await open_fails(named(tmp_path, token=None, hostname="lmgate.example.com"))
    assert "No Cloudflare tunnel token" in message and "Networks → Tunnels" in message
    assert "lmgate tunnel set-token --provider cloudflare" in message
    assert entries(record) == [], "no agent starts without a token"


@pytest.mark.parametrize(
    "token",
    [
        "not a token at all",
        base64.b64encode(b'{"a": "x", "t": "y"}' + b" " * 40).decode(),  # no secret
        base64.b64encode(b"[1, 2, 3]" + b" " * 40).decode(),  # not an object
        "eyJ" + "!" * 60,
    ],
)
async def test_a_malformed_token_is_refused_before_use(
    record: Path, tmp_path: Path, token: str
) -> None:
    message = await open_fails(named(tmp_path, token=token, hostname="lmgate.example.com"))
    assert "does not look like a Cloudflare tunnel token" in message
    assert token not in message
    assert entries(record) == []


async def test_an_invalid_token_is_explained_and_never_echoed(
    record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_ECHO_TOKEN", "1")
    with LogCapture() as logs:
        message = await open_fails(named(tmp_path, token=INVALID, hostname="lmgate.example.com"))
    assert "refused the stored tunnel token" in message and "set-token" in message
    assert INVALID not in message and INVALID not in logs.text
    assert len(entries(record)) == 1


async def test_a_named_tunnel_without_a_hostname_names_the_port(
    record: Path, tmp_path: Path
) -> None:
    port = free_port()
    message = await open_fails(named(tmp_path), port)
    assert "--cloudflare-hostname" in message and "tunnel.cloudflare_hostname" in message
    assert f"http://127.0.0.1:{port}" in message and "token" not in message
    # Neither set: one run says both.
    both = await open_fails(named(tmp_path, token=None), port)
    assert "--cloudflare-hostname" in both and "No Cloudflare tunnel token is set" in both
    assert entries(record) == []


@pytest.mark.parametrize(
    ("variables", "is_named", "expected"),
    [
        ({"FAKE_CLOUDFLARED_RATE_LIMITED": "1"}, False, ["wait a few minutes", "named tunnel"]),
        ({"FAKE_CLOUDFLARED_UNREACHABLE": "1"}, False, ["cannot reach Cloudflare", "7844"]),
        ({"FAKE_CLOUDFLARED_UNREACHABLE": "1"}, True, ["cannot reach Cloudflare", "7844"]),
        (
            {"FAKE_CLOUDFLARED_READY_DELAY": "10", "FAKE_CLOUDFLARED_EXIT_AFTER": "0.3"},
            False,
            ["exited before the tunnel was ready (exit status 1)", "told to die"],
        ),
        ({"FAKE_CLOUDFLARED_READY_DELAY": "10"}, False, ["did not open a tunnel within 2 s"]),
    ],
    ids=["rate-limited", "unreachable-quick", "unreachable-named", "exits-early", "slow"],
)
async def test_agent_failures_become_one_sentence_with_the_fix(
    record: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    is_named: bool,
    expected: list[str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    provider = (
        named(tmp_path, hostname="lmgate.example.com", open_timeout=2)
        if is_named
        else quick(tmp_path, open_timeout=2)
    )
    started = time.monotonic()
    message = await open_fails(provider)
    assert [part for part in expected if part not in message] == [], message
    assert time.monotonic() - started < 6
    (start,) = entries(record)
    assert not pid_alive(int(start["pid"]))


async def test_a_missing_agent_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = CloudflareProvider(
        MemorySecretStore(), tmp_path / "cf", agent_path=str(tmp_path / "no-such-cloudflared")
    )
    message = await open_fails(provider)
    assert "tunnel.cloudflared_path" in message and "developers.cloudflare.com" in message
    monkeypatch.setenv("PATH", str(tmp_path))
    message = await open_fails(CloudflareProvider(MemorySecretStore(), tmp_path / "cf"))
    assert "cloudflared is not installed" in message and "does not download" in message


async def test_an_old_agent_is_refused(
    record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_VERSION", "2022.12.1")
    message = await open_fails(quick(tmp_path))
    assert "2022.12.1" in message and "2023.2.0 or newer" in message
    assert entries(record) == [], "only a proven agent is run"


# ---- while open, and after a crash ----------------------------------------------------------


async def test_the_agents_exit_while_public_reconnects(
    start_identity_gateway: IdentityFactory,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_EXIT_AFTER", "1.5")
    rig = await start_identity_gateway()
    provider = quick(tmp_path)
    providers.append(provider)
    recorder = Recorder()
    # A long periodic interval: only the agent's exit can trigger this reconnect.
    manager: TunnelManager = tunnel_manager(
        provider, rig.server, recorder, health_interval=600, backoff_start=0.2
    )
    try:
        first = await manager.start()
        old_pid = provider.agent_pid
        monkeypatch.setenv("FAKE_CLOUDFLARED_EXIT_AFTER", "0")  # the next agent lives on
        reconnecting = await recorder.reach(TunnelState.RECONNECTING)
        assert "the cloudflared agent exited (code 1)" in reconnecting.message
        back = await recorder.reach_after(TunnelState.RECONNECTING, TunnelState.PUBLIC)
        assert first.public_url and back.public_url
        assert provider.agent_pid not in (None, old_pid)
        async with aiohttp.ClientSession() as s, s.get(back.public_url + "/healthz") as r:
            assert r.status == 200
    finally:
        await manager.stop()
    assert recorder.names == ["starting", "public", "reconnecting", "public", "stopped"]
    assert len(entries(record)) == 2


async def test_a_stale_agent_of_ours_is_stopped_but_not_someone_elses(
    start_identity_gateway: IdentityFactory,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
) -> None:
    rig = await start_identity_gateway()
    port = rig.server.port or 0
    crashed = quick(tmp_path)
    await crashed.open(port)
    stale = crashed.agent_pid
    assert stale is not None and pid_alive(stale)
    del crashed  # LM Gate "crashed": the agent and its PID file are left behind

    # Someone else's cloudflared, running with a config file of its own.
    theirs_config = tmp_path / "theirs.yml"
    theirs_config.write_text("{}\n")
    theirs = subprocess.Popen(
        [AGENT, "tunnel", "--no-autoupdate", "--config", str(theirs_config), "--metrics",
         f"127.0.0.1:{free_port()}", "--url", f"http://127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        provider = quick(tmp_path)
        providers.append(provider)
        await provider.open(port)
        assert not pid_alive(stale), "our crash's leftover is stopped at the next open"
        assert provider.agent_pid not in (None, stale)
        await provider.close()
        # A PID file forged to name someone else's process (with our marker) is ignored.
        provider.pid_path.write_text(
            json.dumps({"pid": theirs.pid, "marker": str(provider.config_path)})
        )
        assert provider.stop_stale_agent() is False
        await provider.open(port)
        assert theirs.poll() is None, "someone else's cloudflared must survive"
        await provider.close()
    finally:
        if theirs.poll() is None:
            theirs.send_signal(signal.SIGTERM)
        theirs.wait(5)
        if pid_alive(stale):
            os.kill(stale, signal.SIGKILL)


async def test_stop_stale_agent_stops_a_running_agent_by_its_pid_file(
    start_identity_gateway: IdentityFactory,
    providers: list[CloudflareProvider],
    record: Path,
    tmp_path: Path,
) -> None:
    """A second stop signal stops the agent by its PID file, whatever the provider is doing."""
    rig = await start_identity_gateway()
    provider = quick(tmp_path)
    providers.append(provider)
    await provider.open(rig.server.port or 0)
    pid = provider.agent_pid
    assert pid is not None
    other = quick(tmp_path)  # e.g. the signal handler's own view of the state directory
    assert other.stop_stale_agent() is True
    assert not pid_alive(pid)
    assert not await provider.alive()
    assert not provider.pid_path.exists() and not provider.config_path.exists()
    await provider.close()


async def test_a_stop_while_opening_leaves_nothing_behind(
    record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_READY_DELAY", "10")
    provider = quick(tmp_path)
    opening = asyncio.ensure_future(provider.open(free_port()))
    deadline = time.monotonic() + 10
    while not entries(record):
        assert time.monotonic() < deadline, "the fake agent never started"
        await asyncio.sleep(0.02)
    pid = int(entries(record)[0]["pid"])
    assert provider.pid_path.exists(), "the PID file names the agent while it starts"
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    deadline = time.monotonic() + 10
    while pid_alive(pid) or provider.config_path.exists():
        assert time.monotonic() < deadline, "the opening was not cleaned up"
        await asyncio.sleep(0.05)
    assert not provider.pid_path.exists()


async def test_a_quick_tunnel_name_that_is_not_cloudflares_is_never_used(
    record: Path, tmp_path: Path
) -> None:
    from tray_app.tunnel.cloudflare import QUICK_HOST

    message = await open_fails(quick(tmp_path, quick_host=QUICK_HOST))
    assert "unexpected address" in message and "trycloudflare.com" in message
    assert QUICK_HOST.fullmatch("seasonal-deck-organisms-sf.trycloudflare.com")
    for hostile in ("evil.example", "a@evil.trycloudflare.com.evil", "x.trycloudflare.com:1"):
        assert not QUICK_HOST.fullmatch(hostile)


async def test_the_metrics_port_is_the_one_the_agent_names_never_one_lm_gate_picked(
    record: Path, tmp_path: Path
) -> None:
    # A port LM Gate chose and freed could be squatted by a local process answering
    # /quicktunnel with its own host; the agent binds port 0 and says where, on its own pipe.
    provider = quick(tmp_path)
    try:
        await provider.open(free_port())
        (entry,) = entries(record)
        argv = entry["argv"]
        assert argv[argv.index("--metrics") + 1] == "127.0.0.1:0"
    finally:
        await provider.close()
