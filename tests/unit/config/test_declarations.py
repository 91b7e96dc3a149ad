"""One declaration per setting: the flags, env vars, `config keys` and the form read from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tray_app.cli.main import _overrides, _parser
from tray_app.config.declaration import FormKind
from tray_app.config.settings import (
    SETTINGS,
    SETTINGS_BY_KEY,
    TABLE_FIELDS,
    Config,
    TunnelProvider,
    load_config,
)


def test_every_config_field_is_a_declared_setting() -> None:
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in TABLE_FIELDS]
    assert fields == [s.attribute for s in SETTINGS]
    assert len(SETTINGS_BY_KEY) == len(SETTINGS), "two settings share a key"


def test_env_vars_come_from_the_key() -> None:
    assert SETTINGS_BY_KEY["limits.max_body_bytes"].env_var == "LMGATE_LIMITS_MAX_BODY_BYTES"
    assert len({s.env_var for s in SETTINGS}) == len(SETTINGS)


def test_every_declared_flag_is_on_serve_and_sets_its_key() -> None:
    flagged = [s for s in SETTINGS if s.flag is not None]
    assert {s.key for s in flagged} >= {"server.port", "tunnel.provider", "secrets.store"}
    argv = ["serve"]
    for s in flagged:
        assert s.flag is not None
        if s.flag.switch:
            argv.append(s.flag.name)
        else:
            argv += [s.flag.name, (s.choices or ("7",))[-1]]
    overrides = _overrides(_parser().parse_args(argv))
    for s in flagged:
        assert s.flag is not None
        expected = "true" if s.flag.switch else (s.choices or ("7",))[-1]
        assert overrides[s.key] == expected, s.key


def test_flags_not_given_change_nothing() -> None:
    overrides = _overrides(_parser().parse_args(["serve"]))
    assert set(overrides.values()) == {None}


def test_common_flags_reach_other_commands() -> None:
    args = _parser().parse_args(["key", "list", "--secret-store", "file", "--data-dir", "/x"])
    overrides = _overrides(args)
    assert overrides["secrets.store"] == "file" and overrides["storage.data_dir"] == "/x"


def test_a_choice_flag_offers_exactly_what_the_setting_accepts() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--tunnel", "wireguard"])
    assert SETTINGS_BY_KEY["tunnel.provider"].choices == (
        "none",
        "cloudflare-quick",
        "ngrok",
        "cloudflare-named",
        "tailscale-serve",
        "tailscale-funnel",
        "lan",
    )


def test_tunnel_provider_is_an_enum_that_still_equals_its_word(tmp_path: Path) -> None:
    config = load_config(
        path=tmp_path / "missing.toml", environ={}, overrides={"tunnel.provider": "LAN"}
    )
    assert config.tunnel_provider is TunnelProvider.LAN
    word: str = config.tunnel_provider  # code that compares with the plain word still works
    assert word == "lan" and f"{word}" == "lan"


def test_form_fields_are_declared_once_and_in_a_clear_order() -> None:
    forms = [s.form for s in SETTINGS if s.form is not None]
    assert len({f.label for f in forms}) == len(forms)
    assert sorted(f.position for f in forms) == list(range(1, len(forms) + 1))
    provider = SETTINGS_BY_KEY["tunnel.provider"]
    assert provider.form is not None and provider.form.kind is FormKind.CHOICE
    assert tuple(v for v, _ in provider.form.choice_labels) == provider.choices


def test_config_keys_markdown_prints_the_readme_table(capsys: pytest.CaptureFixture[str]) -> None:
    from tray_app.cli.main import main
    from tray_app.config.reference import markdown_table

    assert main(["config", "keys", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == markdown_table()
    assert "| `server.port` | `LMGATE_SERVER_PORT` | `--port` | `8787` |" in printed


def test_every_attribute_is_its_key_with_underscores() -> None:
    # One naming rule: reading `limits.max_body_bytes` in a file means
    # `config.limits_max_body_bytes` in the code, for every setting.
    for s in SETTINGS:
        assert s.attribute == s.key.replace(".", "_"), s.key
