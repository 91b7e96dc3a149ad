"""Going public: the tunnel manager, LAN mode, and ngrok through pyngrok's real code path with
the fake agent in tests/fake_ngrok. All traffic stays on loopback (127.0.0.2 plays the LAN)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import FakeTunnelProvider
from tests.helpers import FAKE_NGROK_AGENT, LogCapture
from tray_app.config.settings import Config, TunnelProvider
from tray_app.control.going_public import go_public
from tray_app.errors import ConfigError, TunnelError
from tray_app.secret_store.base import MemorySecretStore
from tray_app.tunnel.lan import LAN_WARNING, LanProvider
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus
from tray_app.tunnel.ngrok import (
    NGROK_AUTHTOKEN,
    NgrokProvider,
    check_token_shape,
    explain,
    silence_pyngrok_logs,
)
from tray_app.tunnel.ngrok_agent import find_agent

AGENT = str(FAKE_NGROK_AGENT)
TOKEN = "2fakeAuthToken_" + "abc123XYZ" * 4


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Recorder:
    def __init__(self) -> None:
        self.states: list[TunnelStatus] = []

    def __call__(self, status: TunnelStatus) -> None:
        self.states.append(status)

    @property
    def names(self) -> list[str]:
        return [s.state.value for s in self.states]


async def wait_for_state(
    recorder: Recorder, state: TunnelState, count: int = 1, timeout: float = 15
) -> TunnelStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [s for s in recorder.states if s.state is state]
        if len(seen) >= count:
            return seen[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached {state} x{count}; saw {recorder.names}")


# ---- the manager, with a fake provider --------------------------------------------------------


async def test_manager_publishes_every_state(start_identity_gateway: IdentityFactory) -> None:
    rig = await start_identity_gateway()
    provider, recorder = FakeTunnelProvider(), Recorder()
    manager = TunnelManager(
        provider, rig.server.port or 0, on_change=recorder, health_interval=0.2, backoff_start=0.05
    )
    status = await manager.start()
    assert (status.state, status.public_url) == (TunnelState.PUBLIC, rig.url)
    provider.lose("session closed")
    await wait_for_state(recorder, TunnelState.PUBLIC, count=2)
    await manager.stop()
    assert recorder.names == ["starting", "public", "reconnecting", "public", "stopped"]
    assert "session closed" in recorder.states[2].message


async def test_manager_backs_off_exponentially(start_identity_gateway: IdentityFactory) -> None:
    rig = await start_identity_gateway()
    provider, recorder = FakeTunnelProvider(), Recorder()
    manager = TunnelManager(
        provider,
        rig.server.port or 0,
        on_change=recorder,
        health_interval=60,
        backoff_start=0.1,
        backoff_max=0.4,
    )
    await manager.start()
    provider.fail_opens = 3
    started = time.monotonic()
    provider.lose()
    back = await wait_for_state(recorder, TunnelState.PUBLIC, count=2)
    elapsed = time.monotonic() - started
    assert [s.attempt for s in recorder.states if s.state is TunnelState.RECONNECTING] == [
        1,
        2,
        3,
        4,
    ]
    assert 0.1 + 0.2 + 0.4 <= elapsed < 3  # 0.1, 0.2, then capped at 0.4
    assert back.attempt == 0
    await manager.stop()


async def test_a_url_that_does_not_work_fails_the_start(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway()
    provider = FakeTunnelProvider(url=f"http://127.0.0.1:{free_port()}")  # nothing listens
    recorder = Recorder()
    manager = TunnelManager(provider, rig.server.port or 0, on_change=recorder, verify_timeout=0.5)
    with pytest.raises(TunnelError, match="could not reach itself"):
        await manager.start()
    assert recorder.names == ["starting", "failed"]
    assert not provider.is_open


async def test_periodic_check_catches_a_silent_loss(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway()
    provider, recorder = FakeTunnelProvider(), Recorder()
    manager = TunnelManager(provider, rig.server.port or 0, on_change=recorder, health_interval=0.2)
    await manager.start()
    provider.is_open = False  # lost without telling anyone
    await wait_for_state(recorder, TunnelState.PUBLIC, count=2)
    assert "health check failed" in recorder.states[2].message
    await manager.stop()


# ---- LAN mode ---------------------------------------------------------------------------------


async def test_lan_mode_listens_on_the_lan_address(start_identity_gateway: IdentityFactory) -> None:
    rig = await start_identity_gateway()
    recorder = Recorder()
    manager = TunnelManager(
        LanProvider(rig.server, address="127.0.0.2"), rig.server.port or 0, on_change=recorder
    )
    status = await manager.start()
    assert status.public_url == f"http://127.0.0.2:{rig.server.port}"
    assert status.warning == LAN_WARNING and "not encrypted" in LAN_WARNING
    async with aiohttp.ClientSession() as s, s.get(status.public_url + "/healthz") as r:
        assert r.status == 200
    await manager.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(f"{status.public_url}/healthz") as r:
            pass
    async with aiohttp.ClientSession() as s, s.get(rig.url + "/healthz") as r:
        assert r.status == 200, "going private must not stop the local gateway"


async def test_lan_mode_without_an_address_explains(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway()
    provider = LanProvider(rig.server, detect=lambda: None)
    with pytest.raises(TunnelError, match="No LAN address"):
        await provider.open(rig.server.port or 0)


async def test_no_tunnel_or_lan_bind_in_dev_mode(start_identity_gateway: IdentityFactory) -> None:
    rig = await start_identity_gateway(auth_dev_mode=True)
    config = Config(
        auth_dev_mode=True, tunnel_provider=TunnelProvider.LAN, tunnel_lan_address="127.0.0.2"
    )
    with pytest.raises(ConfigError, match="refuses to open a tunnel"):
        await go_public(config, rig.server, MemorySecretStore(), Path("/nonexistent"))
    assert not rig.server.has_listener("127.0.0.2")


# ---- ngrok through pyngrok with the fake agent -------------------------------------------


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "agent-record.jsonl"
    monkeypatch.setenv("FAKE_NGROK_RECORD", str(path))
    silence_pyngrok_logs()
    return path


def entries(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture
async def ngrok_provider(tmp_path: Path, record: Path) -> AsyncIterator[NgrokProvider]:
    store = MemorySecretStore({NGROK_AUTHTOKEN: TOKEN})
    provider = NgrokProvider(store, tmp_path / "state" / "ngrok", ngrok_path=AGENT, open_timeout=20)
    yield provider
    await provider.close()


async def test_ngrok_end_to_end_streaming_with_the_openai_client(
    start_identity_gateway: IdentityFactory,
    ngrok_provider: NgrokProvider,
    fake_lmstudio: FakeLMStudio,
    record: Path,
) -> None:
    rig = await start_identity_gateway()
    key = rig.identity.api_keys.create("phone", scopes=frozenset({"chat", "models"}))[0]
    recorder = Recorder()
    manager = TunnelManager(ngrok_provider, rig.server.port or 0, on_change=recorder)
    with LogCapture() as logs:
        status = await manager.start()
        url = status.public_url or ""
        assert url.startswith("http://127.0.0.1:") and url != rig.url
        fake_lmstudio.behaviour.chunks = 6
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as c:
            stream = await c.chat.completions.create(
                model=MODELS[0], stream=True, messages=[{"role": "user", "content": "hi"}]
            )
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        assert text == "".join(f"tok{i} " for i in range(6))
        await manager.stop()
    access = [r for r in logs.access()]
    # The URL was proven by fetching /healthz through it, before anyone else used it.
    assert access[0]["path"] == "/healthz" and access[0]["status"] == 200
    assert any(r["path"] == "/v1/chat/completions" for r in access)
    assert recorder.names == ["starting", "public", "stopped"]


async def test_ngrok_authtoken_never_in_argv_logs_or_readable_files(
    start_identity_gateway: IdentityFactory,
    ngrok_provider: NgrokProvider,
    record: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # pyngrok would copy $NGROK_AUTHTOKEN onto the agent's command line; LM Gate must not.
    monkeypatch.setenv("NGROK_AUTHTOKEN", TOKEN)
    rig = await start_identity_gateway()
    with LogCapture() as logs:
        manager = TunnelManager(ngrok_provider, rig.server.port or 0)
        await manager.start()
        pid = ngrok_provider.agent_pid
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert TOKEN not in argv and "--authtoken" not in argv
        config = ngrok_provider.config_path
        assert config.stat().st_mode & 0o777 == 0o600
        assert config.parent.stat().st_mode & 0o777 == 0o700
        assert TOKEN in config.read_text()  # the one place, private
        for path in tmp_path.rglob("*"):
            if path.is_file() and path != config:
                assert TOKEN not in path.read_text(errors="replace"), path
        await manager.stop()
    assert not config.exists(), "the token's copy goes when the agent goes"
    assert TOKEN not in logs.text


async def test_inspector_off_and_agent_api_on_loopback(
    start_identity_gateway: IdentityFactory,
    ngrok_provider: NgrokProvider,
    record: Path,
) -> None:
    rig = await start_identity_gateway()
    manager = TunnelManager(ngrok_provider, rig.server.port or 0)
    await manager.start()
    await manager.stop()
    start = next(e for e in entries(record) if "start" in e)
    assert start["inspect_db_size"] == -1
    assert start["web_addr"].startswith("127.0.0.1:")
    assert start["config_mode"] == "0o600"
    posted = next(e for e in entries(record) if e.get("api") == "POST")
    assert posted["options"]["inspect"] is False
    assert posted["options"]["upstream"]["url"] == f"http://127.0.0.1:{rig.server.port}"


async def test_quit_leaves_no_agent_behind(
    start_identity_gateway: IdentityFactory, ngrok_provider: NgrokProvider
) -> None:
    rig = await start_identity_gateway()
    manager = TunnelManager(ngrok_provider, rig.server.port or 0)
    await manager.start()
    pid = ngrok_provider.agent_pid
    assert pid is not None and pid_alive(pid)
    assert ngrok_provider.pid_path.read_text().split()[0] == str(pid)
    await manager.stop()
    assert not pid_alive(pid)
    assert not ngrok_provider.pid_path.exists()


async def test_agent_killed_while_public_reconnects_to_the_same_domain(
    start_identity_gateway: IdentityFactory,
    tmp_path: Path,
    record: Path,
) -> None:
    rig = await start_identity_gateway()
    domain = f"http://127.0.0.1:{free_port()}"  # the fake honours a "reserved" loopback URL
    provider = NgrokProvider(
        MemorySecretStore({NGROK_AUTHTOKEN: TOKEN}),
        tmp_path / "ngrok",
        ngrok_path=AGENT,
        domain=domain,
    )
    recorder = Recorder()
    manager = TunnelManager(
        provider, rig.server.port or 0, on_change=recorder, health_interval=5, backoff_start=0.2
    )
    try:
        first = await manager.start()
        assert first.public_url == domain
        old_pid = provider.agent_pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        back = await wait_for_state(recorder, TunnelState.PUBLIC, count=2)
        assert back.public_url == domain, "with a reserved domain the URL (and QR) survives"
        assert provider.agent_pid not in (None, old_pid)
        assert "exited" in recorder.states[2].message
        async with aiohttp.ClientSession() as s, s.get(domain + "/healthz") as r:
            assert r.status == 200
    finally:
        await manager.stop()
    assert recorder.names == ["starting", "public", "reconnecting", "public", "stopped"]


def open_pipes() -> set[str]:
    """The pipes this process holds open, by the kernel's name (``pipe:[inode]``)."""
    held = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("pipe:"):
                held.add(target)
    return held


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
async def test_a_dead_agents_pipe_is_closed_when_it_is_replaced(
    start_identity_gateway: IdentityFactory, tmp_path: Path, record: Path
) -> None:
    # pyngrok never closes the agent's output pipe: each killed agent left a descriptor.
    rig = await start_identity_gateway()
    provider = NgrokProvider(
        MemorySecretStore({NGROK_AUTHTOKEN: TOKEN}), tmp_path / "ngrok", ngrok_path=AGENT
    )
    recorder = Recorder()
    manager = TunnelManager(
        provider, rig.server.port or 0, on_change=recorder, health_interval=5, backoff_start=0.2
    )
    try:
        await manager.start()
        process = provider._process
        assert process is not None and process.proc.stdout is not None
        dead_pipe = os.readlink(f"/proc/self/fd/{process.proc.stdout.fileno()}")
        before = open_pipes()
        assert dead_pipe in before
        old_pid = provider.agent_pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_for_state(recorder, TunnelState.PUBLIC, count=2)
        after = open_pipes()
        assert dead_pipe not in after
        assert len(after) <= len(before), (before, after)  # the new agent's pipe replaced it
    finally:
        await manager.stop()


async def test_a_stale_agent_of_ours_is_stopped_but_not_someone_elses(
    start_identity_gateway: IdentityFactory,
    ngrok_provider: NgrokProvider,
    tmp_path: Path,
) -> None:
    import subprocess

    ngrok_provider.config_path.parent.mkdir(parents=True, mode=0o700)
    ngrok_provider.config_path.write_text(
        json.dumps(
            {"version": "3", "agent": {"authtoken": TOKEN, "web_addr": f"127.0.0.1:{free_port()}"}}
        )
    )
    ngrok_provider.config_path.chmod(0o600)
    ours = subprocess.Popen(
        [AGENT, "start", "--none", "--log", "stdout", "--config", str(ngrok_provider.config_path)],
        stdout=subprocess.DEVNULL,
    )
    theirs_config = tmp_path / "someone-else.yml"
    theirs_config.write_text(
        json.dumps(
            {"version": "3", "agent": {"authtoken": TOKEN, "web_addr": f"127.0.0.1:{free_port()}"}}
        )
    )
    theirs = subprocess.Popen(
        [AGENT, "start", "--none", "--log", "stdout", "--config", str(theirs_config)],
        stdout=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)
        # A crash left our PID file pointing at our agent: it is stopped on the next start.
        ngrok_provider.pid_path.write_text(f"{ours.pid} {ngrok_provider.config_path}\n")
        rig = await start_identity_gateway()
        manager = TunnelManager(ngrok_provider, rig.server.port or 0)
        await manager.start()
        assert ours.wait(5) is not None
        await manager.stop()
        # A PID file that names someone else's ngrok is ignored.
        ngrok_provider.pid_path.write_text(f"{theirs.pid} /elsewhere/ngrok.yml\n")
        await manager.start()
        assert theirs.poll() is None, "someone else's ngrok must survive"
        await manager.stop()
    finally:
        for proc in (ours, theirs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


async def test_pyngrok_calls_never_block_the_event_loop(
    start_identity_gateway: IdentityFactory,
    ngrok_provider: NgrokProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_NGROK_START_DELAY", "1.5")
    rig = await start_identity_gateway()
    manager = TunnelManager(ngrok_provider, rig.server.port or 0)
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


# ---- errors people actually hit ------------------------------------------------------------


async def test_missing_authtoken_says_how_to_set_it(tmp_path: Path, record: Path) -> None:
    provider = NgrokProvider(MemorySecretStore(), tmp_path / "ngrok", ngrok_path=AGENT)
    with pytest.raises(TunnelError, match="lmgate tunnel set-token"):
        await provider.open(1)
    assert entries(record) == [], "no agent starts without a token"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FAKE_NGROK_START_ERROR", "ERR_NGROK_108", "agent sessions"),
        ("FAKE_NGROK_START_ERROR", "ERR_NGROK_4018", "needs an account and authtoken"),
        ("FAKE_NGROK_ENDPOINT_ERROR", "ERR_NGROK_320", "belongs to another account"),
    ],
)
async def test_agent_errors_become_one_sentence_with_the_fix(
    ngrok_provider: NgrokProvider,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(TunnelError) as caught:
        await ngrok_provider.open(free_port())
    message = str(caught.value)
    assert expected in message and value in message
    assert "\n" not in message
    assert ngrok_provider.agent_pid is None
    assert not ngrok_provider.pid_path.exists()


async def test_an_invalid_token_is_explained_and_never_echoed(tmp_path: Path, record: Path) -> None:
    revoked = "revoked" + "Z" * 30
    provider = NgrokProvider(
        MemorySecretStore({NGROK_AUTHTOKEN: revoked}), tmp_path / "ngrok", ngrok_path=AGENT
    )
    with LogCapture() as logs, pytest.raises(TunnelError) as caught:
        await provider.open(free_port())
    assert "ERR_NGROK_107" in str(caught.value) and "invalid" in str(caught.value)
    assert revoked not in str(caught.value)
    assert revoked not in logs.text


async def test_a_malformed_token_is_refused_before_use(tmp_path: Path, record: Path) -> None:
    provider = NgrokProvider(
        MemorySecretStore({NGROK_AUTHTOKEN: "short token!"}), tmp_path / "ngrok", ngrok_path=AGENT
    )
    with pytest.raises(TunnelError, match="does not look like an ngrok authtoken"):
        await provider.open(1)
    assert entries(record) == []
    assert check_token_shape("  " + TOKEN + "\n") == TOKEN


def test_a_missing_agent_binary_explains_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TunnelError, match=r"ngrok\.com/download"):
        find_agent(str(tmp_path / "no-such-ngrok"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("pyngrok.conf.DEFAULT_NGROK_PATH", str(tmp_path / "ngrok"))
    with pytest.raises(TunnelError, match="does not download programs"):
        find_agent("")
    assert not (tmp_path / "ngrok").exists(), "nothing was downloaded"


def test_error_codes_map_to_sentences() -> None:
    for code in (
        "ERR_NGROK_4018",
        "ERR_NGROK_108",
        "ERR_NGROK_105",
        "ERR_NGROK_107",
        "ERR_NGROK_320",
        "ERR_NGROK_7117",
    ):
        sentence = explain(f"failed: {code}\n")
        assert sentence.endswith(f"({code})") and len(sentence) < 300
    assert explain("something else") == ""


async def test_lan_rig_is_reachable_through_the_openai_client(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
) -> None:
    rig: IdentityRig = await start_identity_gateway()
    key = rig.identity.api_keys.create("laptop", scopes=frozenset({"models"}))[0]
    manager = await go_public(
        Config(tunnel_provider=TunnelProvider.LAN, tunnel_lan_address="127.0.0.2"),
        rig.server,
        rig.store,
        Path("/nonexistent"),
    )
    url = manager.status.public_url or ""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as c:
        assert [m.id for m in (await c.models.list()).data] == list(MODELS)
    await manager.stop()


async def test_a_session_lost_per_the_agent_log_is_reconnected(
    start_identity_gateway: IdentityFactory,
    tmp_path: Path,
    record: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_NGROK_DROP_AFTER", "1.0")
    rig = await start_identity_gateway()
    provider = NgrokProvider(
        MemorySecretStore({NGROK_AUTHTOKEN: TOKEN}), tmp_path / "ngrok", ngrok_path=AGENT
    )
    recorder = Recorder()
    # A long periodic interval: only the agent's own log line can trigger this reconnect.
    manager = TunnelManager(
        provider, rig.server.port or 0, on_change=recorder, health_interval=600, backoff_start=0.2
    )
    try:
        await manager.start()
        monkeypatch.setenv("FAKE_NGROK_DROP_AFTER", "0")  # the new agent keeps its session
        reconnecting = await wait_for_state(recorder, TunnelState.RECONNECTING)
        assert "session closed" in reconnecting.message
        back = await wait_for_state(recorder, TunnelState.PUBLIC, count=2)
        async with aiohttp.ClientSession() as s, s.get((back.public_url or "") + "/healthz") as r:
            assert r.status == 200
    finally:
        await manager.stop()


async def test_the_url_check_skips_ngroks_browser_warning() -> None:
    from aiohttp import web

    from tray_app.tunnel.manager import url_works

    seen: list[str | None] = []

    async def healthz(request: web.Request) -> web.Response:
        seen.append(request.headers.get("ngrok-skip-browser-warning"))
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        assert await url_works(f"http://127.0.0.1:{port}")
        assert not await url_works(f"http://127.0.0.1:{port}/nothing-here")
    finally:
        await runner.cleanup()
    assert seen == ["1"]


@pytest.mark.parametrize(
    ("status", "body", "works"),
    [
        (200, {"status": "ok"}, True),
        (503, {"error": {"code": "too_many_connections"}}, True),  # LM Gate, busy
        (503, {"error": {"code": "shutting_down"}}, False),
        (502, {"error": {"code": "too_many_connections"}}, False),
        (200, {"status": "nope"}, False),
    ],
)
async def test_a_busy_gateway_still_proves_the_tunnel_works(
    status: int, body: dict[str, object], works: bool
) -> None:
    """Filling LM Gate's connection slots must not make the tunnel look dead: re-opening it
    would hand a flood a new URL and leave paired phones with a dead one."""
    from aiohttp import web

    from tray_app.tunnel.manager import url_works

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        assert await url_works(f"http://127.0.0.1:{port}") is works
    finally:
        await runner.cleanup()
