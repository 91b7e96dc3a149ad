"""Tailscale Serve and Funnel through the provider's real code path, with the fake `tailscale`
CLI in tests/fake_tailscale: a real gateway in front of FakeLMStudio, the manager the service
uses (tunnel_manager), real processes and sockets on 127.0.0.1. The fake serves plain HTTP (it
cannot hold a trusted certificate), so the provider is given scheme "http"; it forwards with
X-Forwarded-For set to the client's address, as tailscaled's reverse proxy does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import LogCapture
from tray_app.control.going_public import tunnel_manager
from tray_app.errors import TunnelError
from tray_app.tunnel.agent_binary import find_agent
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus
from tray_app.tunnel.tailscale import (
    FUNNEL_PORTS,
    TAILSCALE,
    TailscaleProvider,
    public_url,
    ready_name,
)

AGENT = str(Path(__file__).resolve().parents[2] / "fake_tailscale" / "tailscale")
TAILNET_CLIENT = "100.101.102.200"  # the phone on the tailnet, as tailscaled names it
INTERNET_CLIENT = "203.0.113.7"  # a Funnel visitor
SPOOFED = "198.51.100.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


class Recorder:
    def __init__(self) -> None:
        self.states: list[TunnelStatus] = []

    def __call__(self, status: TunnelStatus) -> None:
        self.states.append(status)

    @property
    def names(self) -> list[str]:
        """The states in order; a status republished in the same state (the stream check's
        figure arriving) counts once."""
        names: list[str] = []
        for status in self.states:
            if not names or names[-1] != status.state.value:
                names.append(status.state.value)
        return names

    async def reach(self, *states: TunnelState, timeout: float = 15) -> TunnelStatus:
        """The status once the manager went through ``states`` in this order."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wanted = list(states)
            for status in self.states:
                if status.state is wanted[0]:
                    wanted.pop(0)
                    if not wanted:
                        return status
            await asyncio.sleep(0.05)
        raise AssertionError(f"never went through {states}; saw {self.names}")


def entries(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def serving(record: Path) -> list[dict[str, Any]]:
    """The recorded serve/funnel runs (not version or status)."""
    return [e for e in entries(record) if e["argv"][:1] in (["serve"], ["funnel"])]


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "tailscale-record.jsonl"
    monkeypatch.setenv("FAKE_TAILSCALE_RECORD", str(path))
    for name in list(os.environ):
        if name.startswith("FAKE_TAILSCALE_") and name != "FAKE_TAILSCALE_RECORD":
            monkeypatch.delenv(name)
    yield path
    # Whatever a test did: never a background config, never a reset of the owner's configs,
    # and no CLI of ours left running.
    for entry in entries(path):
        assert "--bg" not in " ".join(entry["argv"]), entry
        assert "reset" not in entry["argv"], entry
    for entry in serving(path):
        assert wait_dead(entry["pid"]), f"a tailscale CLI was left running: {entry}"


Make = Callable[..., TailscaleProvider]


@pytest.fixture
async def make(tmp_path: Path, record: Path) -> AsyncIterator[Make]:
    providers: list[TailscaleProvider] = []

    def build(**options: Any) -> TailscaleProvider:
        options.setdefault("agent_path", AGENT)
        options.setdefault("scheme", "http")
        options.setdefault("open_timeout", 10.0)
        if "https_port" not in options:
            options["https_port"] = free_port()
            if options.get("funnel"):
                options.setdefault("funnel_ports", (options["https_port"],))
        provider = TailscaleProvider(tmp_path / "state" / "tailscale", **options)
        providers.append(provider)
        return provider

    yield build
    for provider in providers:
        await provider.close()


def manager_for(
    provider: TailscaleProvider, rig: IdentityRig, recorder: Recorder | None = None, **options: Any
) -> TunnelManager:
    return tunnel_manager(provider, rig.server, recorder, **options)


# ---- going public ----------------------------------------------------------------------------


@pytest.mark.parametrize("funnel", [False, True], ids=["serve", "funnel"])
async def test_openai_client_chats_and_streams_through_the_tunnel(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
    make: Make,
    record: Path,
    funnel: bool,
) -> None:
    rig = await start_identity_gateway()
    key = rig.identity.api_keys.create("phone", scopes=frozenset({"chat", "models"}))[0]
    provider = make(funnel=funnel)
    port = provider._https_port
    recorder = Recorder()
    manager = manager_for(provider, rig, recorder)
    with LogCapture() as logs:
        status = await manager.start()
        url = status.public_url or ""
        # Built from `tailscale status --json` (trailing dot gone), not copied from the output.
        assert url == f"http://localhost:{port}"
        assert status.provider == ("tailscale-funnel" if funnel else "tailscale-serve")
        fake_lmstudio.behaviour.chunks = 5
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as c:
            assert [m.id for m in (await c.models.list()).data] == list(MODELS)
            reply = await c.chat.completions.create(
                model=MODELS[0], messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
            stream = await c.chat.completions.create(
                model=MODELS[0], stream=True, messages=[{"role": "user", "content": "hi"}]
            )
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        assert text == "".join(f"tok{i} " for i in range(5))
        pid = provider.agent_pid
        assert pid is not None and pid_alive(pid)
        await manager.stop()
    access = logs.access()
    assert (access[0]["path"], access[0]["status"]) == ("/healthz", 200)
    assert [r["path"] for r in access].count("/v1/chat/completions") == 2
    assert recorder.names == ["starting", "public", "stopped"]
    verb = "funnel" if funnel else "serve"
    runs = serving(record)
    assert [e["argv"] for e in runs] == [
        [verb, f"--https={port}", f"http://127.0.0.1:{rig.server.port}"]
    ]
    assert wait_dead(pid) and not provider.pid_path.exists()


def test_the_public_url_is_the_machine_name_and_port() -> None:
    assert public_url("https", "laptop.tail1234.ts.net", 443) == "https://laptop.tail1234.ts.net"
    assert (
        public_url("https", "laptop.tail1234.ts.net", 8443) == "https://laptop.tail1234.ts.net:8443"
    )
    provider = TailscaleProvider(Path("/nonexistent"))
    assert (provider.name, provider.warning, provider.forwarded_header) == (
        "tailscale-serve",
        None,
        "X-Forwarded-For",
    )
    assert TailscaleProvider(Path("/x"), funnel=True).name == "tailscale-funnel"
    assert FUNNEL_PORTS == (443, 8443, 10000)


# ---- who the client is ----------------------------------------------------------------------


def clients(logs: LogCapture, path: str) -> list[str]:
    return [r["client"] for r in logs.access() if r["path"] == path]


async def claim(session: aiohttp.ClientSession, base: str, address: str) -> int:
    async with session.get(base + "/v1/models", headers={"X-Forwarded-For": address}) as r:
        return r.status


@pytest.mark.parametrize(
    ("funnel", "client"),
    [(False, TAILNET_CLIENT), (True, INTERNET_CLIENT)],
    ids=["serve", "funnel"],
)
async def test_the_client_is_who_tailscale_says_and_only_while_it_runs(
    start_identity_gateway: IdentityFactory,
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
    funnel: bool,
    client: str,
) -> None:
    monkeypatch.setenv("FAKE_TAILSCALE_CLIENT_ADDRESS", client)
    rig = await start_identity_gateway()
    manager = manager_for(make(funnel=funnel), rig)
    with LogCapture() as logs:
        async with aiohttp.ClientSession() as session:
            # No tunnel: a loopback caller's claim is not believed.
            assert await claim(session, rig.url, SPOOFED) == 401
            status = await manager.start()
            public = status.public_url or ""
            # Through the tunnel a forged X-Forwarded-For is replaced by the real client.
            assert await claim(session, public, SPOOFED) == 401
            await manager.stop()
            # Gone again with the tunnel.
            assert await claim(session, rig.url, client) == 401
        logs.wait_for_access(4)
    assert clients(logs, "/v1/models") == ["127.0.0.1", client, "127.0.0.1"]


# ---- what goes wrong, and the one sentence for it -------------------------------------------

PREFLIGHT = [
    # (variable, value, funnel, what the sentence must say)
    ("STATE", "NeedsLogin", False, "not signed in on this computer: run `tailscale up`"),
    ("STATE", "Stopped", False, "switched off on this computer: run `tailscale up`"),
    ("STATE", "NeedsMachineAuth", False, "waiting for a tailnet admin to approve it"),
    ("STATE", "Starting", False, "still connecting"),
    ("STATE", "NoDaemon", False, "(tailscaled) is not running on this computer"),
    ("DNS_NAME", "", False, "MagicDNS is off for your tailnet: enable MagicDNS"),
    ("HTTPS", "off", False, "HTTPS certificates are off for your tailnet"),
    ("HTTPS", "off", True, "HTTPS certificates are off for your tailnet"),
    ("FUNNEL", "off", True, "add the `funnel` node attribute"),
]


@pytest.mark.parametrize(
    ("variable", "value", "funnel", "expected"),
    PREFLIGHT,
    ids=[f"{v}={x or 'empty'}{'-funnel' if f else ''}" for v, x, f, _ in PREFLIGHT],
)
async def test_tailscale_not_ready_is_one_sentence_and_nothing_runs(
    make: Make,
    record: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    funnel: bool,
    expected: str,
) -> None:
    monkeypatch.setenv(f"FAKE_TAILSCALE_{variable}", value)
    provider = make(funnel=funnel)
    with pytest.raises(TunnelError) as caught:
        await provider.open(free_port())
    message = str(caught.value)
    assert (expected in message, "\n" in message, message.endswith("again.")) == (
        True,
        False,
        True,
    ), message
    assert "login.tailscale.com/a/" not in message, "the sign-in link is not shown"
    assert serving(record) == [], "no serve or funnel runs when Tailscale cannot serve"
    assert [e["argv"] for e in entries(record)] == [["version"], ["status", "--json"]]


def test_funnel_without_the_funnel_attribute_names_what_to_enable() -> None:
    # The exact advice, in full: the attribute, where, and the docs.
    with pytest.raises(TunnelError) as caught:
        ready_name(
            {
                "BackendState": "Running",
                "Self": {"DNSName": "laptop.tail1234.ts.net.", "CapMap": {"https": None}},
            },
            funnel=True,
        )
    assert str(caught.value) == (
        "Funnel is not enabled for this tailnet or device: add the `funnel` node attribute "
        "for this device in the access controls (https://login.tailscale.com/admin/acls; see "
        "https://tailscale.com/kb/1223/funnel), with HTTPS certificates on, then go public "
        "again."
    )
    # Older CLIs list capabilities instead of a CapMap.
    name = ready_name(
        {
            "BackendState": "Running",
            "Self": {"DNSName": "laptop.tail1234.ts.net.", "Capabilities": ["https", "funnel"]},
        },
        funnel=True,
    )
    assert name == "laptop.tail1234.ts.net"


CLI_ERRORS = [
    # (variable, value, funnel, what the sentence must say)
    (
        "ENABLE_URL",
        "https://login.tailscale.com/f/serve?node=nFake123",
        False,
        "Tailscale Serve is not enabled for your tailnet: open "
        "https://login.tailscale.com/f/serve?node=nFake123 to enable it",
    ),
    (
        "ENABLE_URL",
        "https://login.tailscale.com/f/funnel?node=nFake123",
        True,
        "Tailscale Funnel is not enabled for your tailnet: open "
        "https://login.tailscale.com/f/funnel?node=nFake123 to enable it",
    ),
    ("DENIED", "1", False, "run `sudo tailscale set --operator=$USER` once"),
    ("DENIED", "1", True, "run `sudo tailscale set --operator=$USER` once"),
    ("BACKGROUND", "1", False, "turn it off with `tailscale serve --https={port} off`"),
    ("BACKGROUND", "1", True, "turn it off with `tailscale funnel --https={port} off`"),
    ("FAIL", "error: something new went wrong", False, "(error: something new went wrong)"),
]


@pytest.mark.parametrize(
    ("variable", "value", "funnel", "expected"),
    CLI_ERRORS,
    ids=[f"{v}{'-funnel' if f else ''}" for v, _, f, _ in CLI_ERRORS],
)
async def test_the_clis_refusals_are_one_sentence_and_it_is_stopped(
    make: Make,
    record: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    funnel: bool,
    expected: str,
) -> None:
    monkeypatch.setenv(f"FAKE_TAILSCALE_{variable}", value)
    provider = make(funnel=funnel, open_timeout=20.0)
    expected = expected.format(port=provider._https_port)
    started = time.monotonic()
    with pytest.raises(TunnelError) as caught:
        await provider.open(free_port())
    message = str(caught.value)
    assert (expected in message, "\n" in message, message.endswith("again.")) == (
        True,
        False,
        True,
    ), message
    # Seen on its output, not waited out: the interactive one would wait for ever.
    assert time.monotonic() - started < 10
    runs = serving(record)
    assert len(runs) == 1
    assert wait_dead(runs[0]["pid"]), "the waiting CLI was stopped"
    assert provider.agent_pid is None and not provider.pid_path.exists()


async def test_enable_text_then_exit_still_gives_the_link(
    make: Make, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When control says not to wait, the real CLI prints the link and exits 0 at once: the
    link must survive the race between its exit and the reading of its output."""
    url = "https://login.tailscale.com/f/funnel?node=nFake456"
    monkeypatch.setenv("FAKE_TAILSCALE_ENABLE_URL", url)
    monkeypatch.setenv("FAKE_TAILSCALE_ENABLE_EXIT", "1")
    for _ in range(5):
        provider = make(funnel=True)
        with pytest.raises(TunnelError) as caught:
            await provider.open(free_port())
        assert str(caught.value) == (
            f"Tailscale Funnel is not enabled for your tailnet: open {url} to enable it, "
            "then go public again."
        )


async def test_a_cli_that_never_gets_ready_times_out(
    make: Make, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TAILSCALE_HANG", "1")
    provider = make(open_timeout=1.0)
    with pytest.raises(TunnelError, match=r"did not start within 1 s"):
        await provider.open(free_port())
    assert wait_dead(serving(record)[0]["pid"])
    assert not provider.pid_path.exists()


@pytest.mark.parametrize("port", [80, 8080, 4443])
async def test_funnel_on_a_port_funnel_does_not_serve_is_refused_before_anything_runs(
    tmp_path: Path, record: Path, port: int
) -> None:
    provider = TailscaleProvider(
        tmp_path / "ts", funnel=True, agent_path=AGENT, https_port=port, scheme="http"
    )
    with pytest.raises(TunnelError) as caught:
        await provider.open(free_port())
    assert str(caught.value) == (
        "Tailscale Funnel serves only on ports 443, 8443, 10000, and "
        f"tunnel.tailscale_https_port is {port}: set it to one of those."
    )
    assert entries(record) == [], "not even the version command ran"


def test_a_missing_or_old_cli_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: Path
) -> None:
    with pytest.raises(TunnelError, match=r"tailscale\.com/download"):
        find_agent(TAILSCALE, str(tmp_path / "no-such-tailscale"))
    with monkeypatch.context() as empty:
        empty.setenv("PATH", str(tmp_path))
        with pytest.raises(TunnelError, match="does not download programs"):
            find_agent(TAILSCALE, "")
    monkeypatch.setenv("FAKE_TAILSCALE_VERSION", "1.50.1")
    old = r"tailscale 1\.50\.1, and LM Gate needs version 1\.52\.0"
    with pytest.raises(TunnelError, match=old):
        find_agent(TAILSCALE, AGENT)
    monkeypatch.setenv("FAKE_TAILSCALE_VERSION", "1.52.0")
    assert find_agent(TAILSCALE, AGENT).version == "1.52.0"


# ---- while public, and after ------------------------------------------------------------------


async def test_the_cli_exiting_while_public_is_reconnected(
    start_identity_gateway: IdentityFactory,
    make: Make,
    record: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_TAILSCALE_EXIT_AFTER", "1.0")
    rig = await start_identity_gateway()
    provider = make()
    recorder = Recorder()
    # A long periodic check: only the CLI's exit can start this reconnect.
    manager = manager_for(provider, rig, recorder, health_interval=600, backoff_start=0.2)
    try:
        first = await manager.start()
        old_pid = provider.agent_pid
        assert old_pid is not None
        monkeypatch.setenv("FAKE_TAILSCALE_EXIT_AFTER", "0")  # the next CLI stays
        reconnecting = await recorder.reach(TunnelState.PUBLIC, TunnelState.RECONNECTING)
        assert "exited" in reconnecting.message
        back = await recorder.reach(TunnelState.RECONNECTING, TunnelState.PUBLIC)
        assert back.public_url == first.public_url, "the machine's name does not change"
        assert provider.agent_pid not in (None, old_pid)
        assert await provider.alive()
        async with aiohttp.ClientSession() as s, s.get(f"{back.public_url}/healthz") as r:
            assert r.status == 200
    finally:
        await manager.stop()
    assert recorder.names == ["starting", "public", "reconnecting", "public", "stopped"]
    assert not await provider.alive()


async def test_close_leaves_no_cli_and_no_pid_file(
    start_identity_gateway: IdentityFactory, make: Make
) -> None:
    rig = await start_identity_gateway()
    provider = make()
    manager = manager_for(provider, rig)
    status = await manager.start()
    pid = provider.agent_pid
    assert pid is not None and pid_alive(pid)
    assert json.loads(provider.pid_path.read_text())["pid"] == pid
    await manager.stop()
    assert wait_dead(pid)
    assert not provider.pid_path.exists()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(f"{status.public_url}/healthz"):
            pass
    await provider.close()  # a second close is harmless


async def test_a_close_while_opening_stops_the_cli_at_once(
    make: Make, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TAILSCALE_HANG", "1")
    provider = make(open_timeout=30.0)
    opening = asyncio.ensure_future(provider.open(free_port()))
    deadline = time.monotonic() + 10
    while not serving(record) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await provider.close()
    with pytest.raises(TunnelError, match="went private before Tailscale Serve finished"):
        await opening
    assert time.monotonic() - started < 5
    assert wait_dead(serving(record)[0]["pid"])
    assert not provider.pid_path.exists()


async def test_a_crashed_lm_gates_cli_is_stopped_at_the_next_open(
    start_identity_gateway: IdentityFactory, make: Make, record: Path
) -> None:
    rig = await start_identity_gateway()
    port = free_port()
    crashed = make(https_port=port)
    await crashed.open(rig.server.port or 0)
    leftover = crashed.agent_pid
    assert leftover is not None
    # LM Gate "crashes": nobody closes that provider; its CLI (its own session) runs on.
    assert pid_alive(leftover)
    again = make(https_port=port)  # the next LM Gate: same state directory, same port
    manager = manager_for(again, rig)
    status = await manager.start()
    assert wait_dead(leftover), "the leftover CLI was stopped"
    assert again.agent_pid not in (None, leftover)
    async with aiohttp.ClientSession() as s, s.get(f"{status.public_url}/healthz") as r:
        assert r.status == 200
    await manager.stop()


async def test_a_pid_file_naming_someone_elses_process_does_not_kill_it(
    start_identity_gateway: IdentityFactory, make: Make, tmp_path: Path
) -> None:
    rig = await start_identity_gateway()
    provider = make()
    # The owner's own `tailscale serve` in a terminal, and some unrelated process.
    theirs_port = free_port()
    theirs = subprocess.Popen(
        [AGENT, "serve", f"--https={theirs_port}", f"http://127.0.0.1:{free_port()}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        await asyncio.sleep(0.3)
        provider.pid_path.parent.mkdir(parents=True, exist_ok=True)
        ours = f"serve --https={provider._https_port} http://127.0.0.1:{rig.server.port}"
        for victim in (theirs, other):
            provider.pid_path.write_text(json.dumps({"pid": victim.pid, "marker": ours}))
            assert provider.stop_stale_agent() is False
            assert not provider.pid_path.exists()
            provider.pid_path.write_text(json.dumps({"pid": victim.pid, "marker": ours}))
            manager = manager_for(provider, rig)
            await manager.start()
            await manager.stop()
        assert (theirs.poll(), other.poll()) == (None, None), "someone else's survives"
    finally:
        for proc in (theirs, other):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(5)


@pytest.mark.parametrize(
    "hostile",
    [
        "evil.com@laptop.ts.net.",
        "laptop.ts.net:8443.",
        "a b.ts.net.",
        "<b>x</b>.ts.net.",
        "x" * 300,
    ],
)
def test_a_machine_name_that_is_not_a_dns_name_is_never_used(hostile: str) -> None:
    from tray_app.tunnel.tailscale import ready_name

    def status(name: str) -> dict[str, Any]:
        me = {"DNSName": name, "CapMap": {"https": None, "funnel": None}}
        return {"BackendState": "Running", "Self": me}

    with pytest.raises(TunnelError, match="not a DNS name"):
        ready_name(status(hostile), funnel=False)
    assert ready_name(status("Laptop.tail1234.ts.net."), funnel=True) == "laptop.tail1234.ts.net"
