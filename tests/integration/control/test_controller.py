"""The controller (no Qt) with the real gateway, LAN mode on 127.0.0.2 or the fake ngrok agent,
the fake LM Studio, and an in-memory secret store; plus the tray driving it for real."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import FAKE_NGROK_AGENT, sse_events
from tests.integration.control.test_service import files_open_under, needs_proc
from tray_app.config.settings import Config, load_config
from tray_app.control.autostart import Autostart
from tray_app.control.controller import (
    AppState,
    Controller,
    Phase,
    ThreadedController,
    curl_snippet,
)
from tray_app.errors import LMGateError, TunnelError
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN

AGENT = str(FAKE_NGROK_AGENT)
TOKEN = "2fakeAuthToken_" + "abc123XYZ" * 4


@pytest.fixture
def make(tmp_path: Path, lmstudio_thread: FakeLMStudio) -> Iterator:  # type: ignore[type-arg]
    made: list[ThreadedController] = []

    def build(store: MemorySecretStore | None = None, **settings: object) -> ThreadedController:
        settings.setdefault("upstream_url", lmstudio_thread.url)
        settings.setdefault("server_port", 0)
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("storage_data_dir", str(tmp_path / "data"))
        settings.setdefault("tunnel_lan_address", "127.0.0.2")
        config = Config(**settings)  # type: ignore[arg-type]
        controller = ThreadedController(
            Controller(
                config,
                config_path=tmp_path / "config.toml",
                store=store or MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
                autostart=Autostart(["lmgate"], platform="linux", home=tmp_path / "home"),
            )
        )
        made.append(controller)
        return controller

    yield build
    for controller in made:
        controller.shutdown()


def test_start_publishes_private_state_and_first_run_needs(make) -> None:  # type: ignore[no-untyped-def]
    controller = make()
    seen: list[AppState] = []
    controller.add_listener(seen.append)
    state = controller.start().result(20)
    assert state.phase == Phase.PRIVATE and state.gateway_url
    assert state.lmstudio_reachable is True
    assert state.needs_tunnel is True, "no tunnel configured yet"
    assert [s.phase for s in seen][:2] == [Phase.STARTING, Phase.PRIVATE]
    assert state.tunnel_setup is not None and "Cloudflare quick tunnel" in state.tunnel_setup
    with pytest.raises(TunnelError, match="Choose how to go public in Settings"):
        controller.go_public().result(10)


def test_choosing_a_tunnel_keeps_it_and_goes_public(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    controller = make()
    controller.start().result(20)
    with pytest.raises(LMGateError, match="choose a way"):
        controller.choose_tunnel("none").result(10)
    with pytest.raises(ValueError, match="wireguard"):
        controller.choose_tunnel("wireguard").result(10)
    state = controller.choose_tunnel("lan").result(40)
    assert state.phase == Phase.PUBLIC and state.public_url.startswith("http://127.0.0.2:")
    assert not state.needs_tunnel and state.tunnel_setup is None
    written = load_config(path=tmp_path / "config.toml", environ={}, overrides={})
    assert written.tunnel_provider == "lan"
    rows = {row.choice.provider.value: row for row in controller.tunnel_choices().result(10)}
    assert rows["lan"].program_found and set(rows) >= {"cloudflare-quick", "tailscale-serve"}
    assert not (tmp_path / "config.toml.tmp").exists()


def test_choosing_a_tunnel_in_dev_mode_is_refused_and_writes_nothing(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    controller = make(auth_dev_mode=True)
    controller.start().result(20)
    with pytest.raises(LMGateError, match="dev mode"):
        controller.choose_tunnel("cloudflare-quick").result(10)
    assert not (tmp_path / "config.toml").exists()


@needs_proc
def test_a_failed_bind_shows_the_error_and_closes_the_database(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        controller = make(server_port=holder.getsockname()[1])
        state = controller.start().result(20)
    assert state.phase == Phase.ERROR and "already in use" in state.message
    # The tray used to keep the identity database open after a failed start, until quit.
    assert files_open_under(tmp_path / "data") == []
    with pytest.raises(LMGateError, match="not running"):
        controller.credentials().result(5)


def test_the_tray_makes_no_key_on_its_first_run(make) -> None:  # type: ignore[no-untyped-def]
    # It has nowhere to show one once; it makes each key when asked and shows it then.
    controller = make()
    controller.start().result(20)
    assert controller.credentials().result(5) == []


def test_go_public_at_start(make) -> None:  # type: ignore[no-untyped-def]
    controller = make(tunnel_provider="lan", tunnel_go_public_at_start=True)
    state = controller.start().result(30)
    assert state.phase == Phase.PUBLIC and state.public_url.startswith("http://127.0.0.2:")


def test_lan_public_pairing_kill_switch(make) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    controller = make(tunnel_provider="lan")
    controller.start().result(20)
    state = controller.go_public().result(30)
    assert state.phase == Phase.PUBLIC and state.public_url.startswith("http://127.0.0.2:")
    assert "not encrypted" in (state.warning or "")
    link = controller.pairing_link().result(5)
    assert link.url.startswith(state.public_url + "/#") and len(link.url) <= 200
    request = urllib.request.Request(
        state.public_url + "/pair", method="POST", data=json.dumps({"code": link.code}).encode()
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        device_token = json.loads(r.read())["token"]
    kinds = [c.kind for c in controller.credentials().result(5)]
    assert "device" in kinds
    state = controller.go_private(revoke_devices=True).result(10)
    assert state.phase == Phase.PRIVATE and state.public_url is None
    devices = [c for c in controller.credentials().result(5) if c.kind == "device"]
    assert devices and not any(d.active for d in devices)
    check = urllib.request.Request(
        state.gateway_url + "/v1/models", headers={"Authorization": f"Bearer {device_token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(check, timeout=5)
    assert caught.value.code == 401
    caught.value.close()


def test_curl_snippet_runs_verbatim(make, lmstudio_thread: FakeLMStudio) -> None:  # type: ignore[no-untyped-def]
    controller = make(tunnel_provider="lan", auth_allowed_models=(MODELS[1],))
    controller.start().result(20)
    controller.go_public().result(30)
    snippet = controller.curl_snippet().result(10)
    assert "ngrok-skip-browser-warning: 1" in snippet and f'"model": "{MODELS[1]}"' in snippet
    result = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert sse_events(result.stdout.encode())[-1] == "[DONE]"
    token = next(c for c in controller.credentials().result(5) if c.kind == "token")
    assert token.detail == "chat", "the snippet's token can only chat"


def test_curl_snippet_quotes_awkward_model_names() -> None:
    snippet = curl_snippet("https://x.example", "tok", 'it\'s "odd" $(rm -rf)')
    result = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + snippet.split(" -d ", 1)[1]],
        capture_output=True,
        text=True,
    )
    assert json.loads(result.stdout)["model"] == 'it\'s "odd" $(rm -rf)'


def test_settings_round_trip_through_an_in_memory_store(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Saving restarts from the file: without a port in it, on the default 8787, which a
    # running LM Gate holds on a developer's machine. Port 0 is any free one.
    (tmp_path / "config.toml").write_text("[server]\nport = 0\n", encoding="utf-8")
    store = MemorySecretStore()
    controller = make(store=store)
    controller.start().result(20)
    settings = controller.settings().result(5)
    assert not settings.ngrok_token_set and not settings.start_at_login
    from dataclasses import replace

    new = replace(
        settings,
        tunnel_provider="ngrok",
        tunnel_ngrok_domain="calm-otter.ngrok-free.app",
        auth_allowed_models=(MODELS[0],),
        limits_requests_per_minute=30,
        start_at_login=True,
        new_ngrok_token=TOKEN,
        new_lmstudio_token="sk-lm-xyz",
    )
    state = controller.save_settings(new).result(30)
    assert state.phase == Phase.PRIVATE and state.needs_tunnel is False
    assert store.get(NGROK_AUTHTOKEN) == TOKEN and store.get(LMSTUDIO_API_TOKEN) == "sk-lm-xyz"
    written = (tmp_path / "config.toml").read_text()
    assert TOKEN not in written and "sk-lm-xyz" not in written
    config = load_config(path=tmp_path / "config.toml", environ={})
    assert config.tunnel_provider == "ngrok" and config.auth_allowed_models == (MODELS[0],)
    assert config.limits_requests_per_minute == 30
    assert (tmp_path / "home" / ".config" / "autostart" / "lmgate.desktop").exists()
    again = controller.settings().result(5)
    assert again.ngrok_token_set and again.start_at_login and again.limits_requests_per_minute == 30
    assert again.new_ngrok_token is None


def test_saving_settings_keeps_the_other_upstreams(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The Settings window does not edit [upstreams.NAME] tables: a save keeps them."""
    (tmp_path / "config.toml").write_text(
        '[server]\nport = 0\n[upstreams.desk]\nurl = "http://127.0.0.1:3000"\nweight = 2\n',
        encoding="utf-8",
    )
    controller = make(store=MemorySecretStore())
    controller.start().result(20)
    from dataclasses import replace

    new = replace(controller.settings().result(5), limits_requests_per_minute=31)
    controller.save_settings(new).result(30)
    config = load_config(path=tmp_path / "config.toml", environ={})
    assert config.limits_requests_per_minute == 31
    assert [(u.name, u.url, u.weight) for u in config.all_upstreams][1:] == [
        ("desk", "http://127.0.0.1:3000", 2)
    ]


def test_test_connection_reports_models_or_the_exact_error(make, lmstudio_thread) -> None:  # type: ignore[no-untyped-def]
    controller = make()
    controller.start().result(20)
    ok, models = controller.test_connection(lmstudio_thread.url).result(10)
    assert ok and models == list(MODELS)
    ok, error = controller.test_connection("http://127.0.0.1:9").result(10)
    assert not ok and "not reachable at http://127.0.0.1:9" in error[0]
    # In words, not the exception's class name.
    assert "(nothing accepts connections there)" in error[0] and "Error" not in error[0]
    lmstudio_thread.behaviour.require_token = "right"
    ok, error = controller.test_connection(lmstudio_thread.url, "wrong").result(10)
    assert not ok and "requires an API token" in error[0]


def test_autostart_entries(tmp_path: Path) -> None:
    import plistlib

    linux = Autostart(["/usr/bin/lmgate"], platform="linux", home=tmp_path)
    linux.enable()
    assert linux.is_enabled() and "Exec=/usr/bin/lmgate" in linux.path.read_text()  # type: ignore[union-attr]
    linux.disable()
    assert not linux.is_enabled()
    mac = Autostart(["/Applications/LM Gate.app/lmgate"], platform="darwin", home=tmp_path)
    mac.enable()
    plist = plistlib.loads(mac.path.read_bytes())  # type: ignore[union-attr]
    assert plist["ProgramArguments"] == ["/Applications/LM Gate.app/lmgate"]
    assert plist["RunAtLoad"] is True


def test_tray_go_public_to_a_working_curl_with_the_real_core(  # type: ignore[no-untyped-def]
    qtbot,
    make,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("PySide6")
    from PySide6.QtGui import QGuiApplication

    from tray_app.ui.app import TrayApp

    record = tmp_path / "agent.jsonl"
    monkeypatch.setenv("FAKE_NGROK_RECORD", str(record))
    store = MemorySecretStore({NGROK_AUTHTOKEN: TOKEN, LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})
    controller = make(store=store, tunnel_provider="ngrok", tunnel_ngrok_path=AGENT)
    app = TrayApp(controller, instance=f"lmgate-real-{time.time_ns()}")
    try:
        app.start()
        qtbot.waitUntil(lambda: app.actions.state.phase == Phase.PRIVATE, timeout=20000)
        menu = app.window.menu
        menu.rebuild()
        menu.action("Go public").trigger()
        qtbot.waitUntil(lambda: app.actions.state.phase == Phase.PUBLIC, timeout=30000)
        public = app.actions.state.public_url or ""
        assert public.startswith("http://127.0.0.1:") and public != app.actions.state.gateway_url
        menu.rebuild()
        menu.action("Copy curl snippet").trigger()
        clipboard = QGuiApplication.clipboard()
        qtbot.waitUntil(lambda: clipboard.text().startswith("curl"), timeout=10000)
        snippet = clipboard.text()
        assert public in snippet
        result = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        events = sse_events(result.stdout.encode())
        assert events[-1] == "[DONE]"
        assert "tok0" in "".join(events)
    finally:
        app.quit()
    # Quit closed the tunnel: the agent is gone, nothing is left behind.
    agent_pid = next(
        json.loads(line)["pid"] for line in record.read_text().splitlines() if '"start"' in line
    )
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(agent_pid, 0)
