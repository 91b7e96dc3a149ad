"""The one startup sequence (`lmgate serve` and the tray both run it), with the real gateway on
a real port, the fake LM Studio and an in-memory secret store: what a start opens, what a
failed start leaves behind (nothing), and when the first key is made."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import FakeLMStudio
from tray_app.config.settings import Config
from tray_app.control.assembly import open_identity
from tray_app.control.service import FIRST_KEY_NAME, GatewayService
from tray_app.errors import ConfigError, LMGateError
from tray_app.identity.principal import ALL_SCOPES
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore

PROC_FDS = Path("/proc/self/fd")
needs_proc = pytest.mark.skipif(not PROC_FDS.is_dir(), reason="counts open files in /proc")


def files_open_under(directory: Path) -> list[str]:
    """Every file this process holds open below ``directory`` (the database and its WAL)."""
    found = []
    for fd in PROC_FDS.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing (the listing's own descriptor)
        if target.startswith(str(directory) + os.sep):
            found.append(target)
    return found


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def config_for(tmp_path: Path, upstream: str, **settings: Any) -> Config:
    settings.setdefault("server_port", 0)
    return Config(
        upstream_url=upstream,
        streaming_heartbeat_interval=0.0,
        server_shutdown_grace=1.0,
        storage_data_dir=str(tmp_path / "data"),
        **settings,
    )


def store() -> MemorySecretStore:
    return MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})


def keys_in(config: Config) -> list[tuple[str, frozenset[str]]]:
    identity = open_identity(config, b"k" * 32)
    try:
        return [(k.name, k.scopes) for k in identity.api_keys.list()]
    finally:
        identity.close()


@needs_proc
async def test_a_start_opens_everything_and_a_stop_closes_it_in_reverse(
    tmp_path: Path, fake_lmstudio: FakeLMStudio
) -> None:
    config = config_for(tmp_path, fake_lmstudio.url)
    service = GatewayService(config, store=store())
    started = await service.start()
    assert service.running and started.url == service.server.url
    assert started.lmstudio_reachable is True
    assert fake_lmstudio.received[-1].headers["Authorization"] == f"Bearer {LMSTUDIO_TOKEN}"
    assert (started.store_problem, started.key_warning, started.first_key) == (None, None, None)
    assert files_open_under(tmp_path / "data"), "the identity database is open"
    port = service.server.port
    await service.stop()
    assert not service.running and files_open_under(tmp_path / "data") == []
    with pytest.raises(LMGateError, match="not running"):
        _ = service.identity
    with socket.socket() as again:
        again.bind(("127.0.0.1", port or 0))  # the port is free again
    await service.stop()  # a second stop does nothing


async def test_lm_studio_down_still_starts_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nothing = f"http://127.0.0.1:{s.getsockname()[1]}"
    service = GatewayService(config_for(tmp_path, nothing), store=store())
    started = await service.start()
    try:
        assert started.lmstudio_reachable is False
    finally:
        await service.stop()


@needs_proc
async def test_a_failed_bind_leaves_nothing_open_and_no_key(
    tmp_path: Path, fake_lmstudio: FakeLMStudio, taken_port: int
) -> None:
    config = config_for(tmp_path, fake_lmstudio.url, server_port=taken_port)
    service = GatewayService(config, store=store())
    with pytest.raises(ConfigError, match="already in use"):
        await service.start(first_key=True)
    assert not service.running
    assert files_open_under(tmp_path / "data") == [], "the identity database was closed"
    # `lmgate serve` on a terminal used to make the owner key before binding: a key nobody
    # was ever shown, which also kept the next start from making (and showing) one.
    assert keys_in(config) == []
    with pytest.raises(LMGateError, match="not running"):
        _ = service.identity


async def test_the_first_key_is_made_once_and_only_when_asked(
    tmp_path: Path, fake_lmstudio: FakeLMStudio
) -> None:
    config = config_for(tmp_path, fake_lmstudio.url)
    tray = GatewayService(config, store=store())
    assert (await tray.start()).first_key is None, "a front-end that cannot show one gets none"
    await tray.stop()
    assert keys_in(config) == []
    terminal = GatewayService(config, store=store())
    key = (await terminal.start(first_key=True)).first_key
    assert key is not None and key.startswith("lmg_")
    record, _principal = terminal.identity.api_keys.verify(key)
    assert record.name == FIRST_KEY_NAME
    await terminal.stop()
    assert keys_in(config) == [(FIRST_KEY_NAME, ALL_SCOPES)]
    again = GatewayService(config, store=store())
    assert (await again.start(first_key=True)).first_key is None, "there is a key already"
    await again.stop()
    assert len(keys_in(config)) == 1


async def test_starting_twice_is_refused(tmp_path: Path, fake_lmstudio: FakeLMStudio) -> None:
    service = GatewayService(config_for(tmp_path, fake_lmstudio.url), store=store())
    await service.start()
    try:
        with pytest.raises(LMGateError, match="already running"):
            await service.start()
    finally:
        await service.stop()


@pytest.fixture
def silent_lmstudio() -> Iterator[str]:
    """An LM Studio that accepts connections and never answers: the probe waits its 5 s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


async def test_a_start_interrupted_while_lm_studio_is_asked_leaves_no_key_and_nothing_open(
    tmp_path: Path, silent_lmstudio: str
) -> None:
    config = config_for(tmp_path, silent_lmstudio)
    service = GatewayService(config, store=store())
    start = asyncio.ensure_future(service.start(first_key=True))
    await asyncio.sleep(0.5)  # the server listens; the probe waits for LM Studio
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert not service.running
    assert files_open_under(tmp_path / "data") == []
    # The key used to be made before the probe: an all-scope key nobody was ever shown.
    assert keys_in(config) == []
