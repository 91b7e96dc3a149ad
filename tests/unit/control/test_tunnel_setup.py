"""What "set up to go public" means for each provider, and the options side by side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tray_app.config.parsers import TunnelProvider
from tray_app.config.settings import SETTINGS_BY_KEY, Config, load_config
from tray_app.control.tunnel_setup import CHOOSE, NO_ACCOUNT_PROVIDER, choice_rows, missing_setup
from tray_app.secret_store.base import MemorySecretStore
from tray_app.tunnel.choices import CHOICES, CHOICES_BY_PROVIDER, program_found
from tray_app.tunnel.cloudflare import CLOUDFLARE_TUNNEL_TOKEN
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN


def config_for(tmp_path: Path, provider: str, hostname: str = "") -> Config:
    base = load_config(path=tmp_path / "none.toml", environ={}, overrides={})
    return replace(
        base, tunnel_provider=TunnelProvider(provider), tunnel_cloudflare_hostname=hostname
    )


def test_every_provider_the_setting_accepts_is_declared_once() -> None:
    accepted = set(SETTINGS_BY_KEY["tunnel.provider"].choices or ()) - {"none"}
    assert [c.provider.value for c in CHOICES] == list(
        dict.fromkeys(c.provider.value for c in CHOICES)
    )
    assert {c.provider.value for c in CHOICES} == accepted
    assert CHOICES_BY_PROVIDER[TunnelProvider(NO_ACCOUNT_PROVIDER)].account == "none"


@pytest.mark.parametrize(
    ("provider", "secrets", "hostname", "missing"),
    [
        ("none", {}, "", CHOOSE),
        ("lan", {}, "", None),
        ("cloudflare-quick", {}, "", None),
        ("tailscale-serve", {}, "", None),
        ("tailscale-funnel", {}, "", None),
        ("ngrok", {}, "", "ngrok authtoken"),
        ("ngrok", {NGROK_AUTHTOKEN: "t"}, "", None),
        ("cloudflare-named", {}, "chat.example.com", "token"),
        (
            "cloudflare-named",
            {},
            "",
            "--provider cloudflare`) and enter the hostname",
        ),
        ("cloudflare-named", {CLOUDFLARE_TUNNEL_TOKEN: "t"}, "", "hostname"),
        (
            "cloudflare-named",
            {CLOUDFLARE_TUNNEL_TOKEN: "t"},
            "chat.example.com",
            None,
        ),
    ],
)
def test_what_is_missing_before_going_public(
    tmp_path: Path,
    provider: str,
    secrets: dict[str, str],
    hostname: str,
    missing: str | None,
) -> None:
    store = MemorySecretStore()
    for key, value in secrets.items():
        store.set(key, value)
    said = missing_setup(config_for(tmp_path, provider, hostname), store)
    if missing is None:
        assert said is None
    else:
        assert said is not None and missing in said


def test_an_agent_is_looked_for_on_path_or_at_its_setting_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = CHOICES_BY_PROVIDER[TunnelProvider.CLOUDFLARE_QUICK]
    lan = CHOICES_BY_PROVIDER[TunnelProvider.LAN]
    ran = tmp_path / "ran"
    program = tmp_path / "bin" / "cloudflared"
    program.parent.mkdir()
    program.write_text(f"#!/bin/sh\ntouch {ran}\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert program_found(lan)
    assert not program_found(quick)
    assert not program_found(quick, str(program))  # not executable yet
    program.chmod(0o755)
    assert program_found(quick, str(program))
    monkeypatch.setenv("PATH", str(program.parent))
    assert program_found(quick)
    rows = {r.choice.provider: r.program_found for r in choice_rows(config_for(tmp_path, "none"))}
    assert rows[TunnelProvider.CLOUDFLARE_QUICK] and rows[TunnelProvider.CLOUDFLARE_NAMED]
    assert not rows[TunnelProvider.TAILSCALE_SERVE]
    assert not ran.exists()
