"""A stop while the tunnel still opens: the agent runs from the moment pyngrok starts it, long
before pyngrok hands it back, so its PID file must exist by then (a second stop signal stops
the agent by that file), and an orderly stop must wait for the opening and close what it
opened — no agent, no config file with the authtoken, no PID file left."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import FAKE_NGROK_AGENT, free_port
from tests.stopping import TOKEN, running, wait_gone
from tray_app.config.settings import Config, TunnelProvider
from tray_app.control.service import GatewayService
from tray_app.errors import LMGateError, TunnelError
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.tasks import spawn
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, NgrokProvider, silence_pyngrok_logs

START_DELAY = "2"  # the fake agent's wait before its startup lines: a slow network


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "agent-record.jsonl"
    monkeypatch.setenv("FAKE_NGROK_RECORD", str(path))
    monkeypatch.setenv("FAKE_NGROK_START_DELAY", START_DELAY)
    silence_pyngrok_logs()
    return path


async def agent_started(record: Path, timeout: float = 15.0) -> int:
    """The PID of the fake agent once it runs (it records its start before the delay)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if record.exists():
            for line in record.read_text().splitlines():
                entry = json.loads(line)
                if "start" in entry:
                    return int(entry["pid"])
        await asyncio.sleep(0.02)
    raise AssertionError("the fake agent never started")


async def test_the_pid_file_names_the_agent_while_it_is_still_starting(
    tmp_path: Path, record: Path
) -> None:
    provider = NgrokProvider(
        MemorySecretStore({NGROK_AUTHTOKEN: TOKEN}),
        tmp_path / "ngrok",
        ngrok_path=str(FAKE_NGROK_AGENT),
        open_timeout=20,
    )
    opening = spawn(provider.open(free_port()))
    try:
        pid = await agent_started(record)
        await asyncio.sleep(0.2)  # well inside the start delay: pyngrok still waits for it
        assert not opening.done()
        assert provider.pid_path.read_text().split()[0] == str(pid)
    finally:
        with contextlib.suppress(TunnelError):
            await opening
        await provider.close()
    assert not provider.pid_path.exists()


async def test_a_stop_while_going_public_closes_the_tunnel_it_opened(
    tmp_path: Path, record: Path, fake_lmstudio: FakeLMStudio
) -> None:
    config = Config(
        upstream_url=fake_lmstudio.url,
        server_port=0,
        server_shutdown_grace=1.0,
        storage_data_dir=str(tmp_path / "data"),
        tunnel_provider=TunnelProvider.NGROK,
        tunnel_ngrok_path=str(FAKE_NGROK_AGENT),
    )
    secrets = MemorySecretStore({NGROK_AUTHTOKEN: TOKEN, LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})
    service = GatewayService(config, store=secrets)
    await service.start()
    going = spawn(service.go_public())
    try:
        pid = await agent_started(record)
        await service.stop()
        with pytest.raises(LMGateError, match="went private before the tunnel finished"):
            await going
    finally:
        await service.stop()
        if not going.done():
            going.cancel()
    assert wait_gone(pid), f"the agent (pid {pid}) outlived the stop"
    assert not running(pid)
    assert service.tunnel is None
    left = sorted(p.name for p in (tmp_path / "data" / "ngrok").iterdir())
    assert left == [], f"left behind: {left}"
