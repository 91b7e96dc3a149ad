"""`lmgate` without a command takes the same setting flags as `serve`, and `--config`: they
reach the tray app (which keeps them over Settings saves), or the headless fallback when there
is no desktop. Given before a command they would set nothing, so that is a usage error."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import LMGATE, Env, curl
from tray_app.cli.main import TrayLaunch, main
from tray_app.config.settings import SETTINGS

FLAGGED = [s for s in SETTINGS if s.flag is not None]


def _value(setting_choices: tuple[str, ...] | None) -> str:
    return (setting_choices or ("7",))[-1]


@pytest.fixture
def desktop(monkeypatch: pytest.MonkeyPatch) -> None:
    # How the CLI tells that a tray can show (a Qt platform is named); nothing Qt runs here.
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")


def _launch(argv: list[str]) -> TrayLaunch:
    launched: list[TrayLaunch] = []

    def run_tray(launch: TrayLaunch) -> int:
        launched.append(launch)
        return 0

    assert main(argv, run_tray=run_tray) == 0
    [launch] = launched
    return launch


def test_every_setting_flag_reaches_the_tray(desktop: None, tmp_path: Path) -> None:
    argv = ["--go-public", "--config", str(tmp_path / "c.toml")]
    for s in FLAGGED:
        assert s.flag is not None
        argv += [s.flag.name] if s.flag.switch else [s.flag.name, _value(s.choices)]
    launch = _launch(argv)
    assert launch.wishes == ["go-public"]
    assert launch.config_path == tmp_path / "c.toml"
    for s in FLAGGED:
        assert s.flag is not None
        assert launch.overrides[s.key] == ("true" if s.flag.switch else _value(s.choices))


def test_a_plain_launch_overrides_nothing(desktop: None) -> None:
    launch = _launch([])
    assert launch == TrayLaunch([], None, launch.overrides)
    assert set(launch.overrides.values()) == {None}
    assert launch.flags_given == []


def test_the_flags_given_are_named_as_typed(desktop: None) -> None:
    launch = _launch(["--port", "9123", "--config", "x.toml", "--enable-messages"])
    assert launch.flags_given == ["--config", "--port", "--enable-messages"]


@pytest.mark.parametrize(
    ("before", "command"),
    [
        (["--port", "9123"], ["serve"]),
        (["--port", "9123"], ["doctor"]),
        (["--data-dir", "/x"], ["key", "list"]),
        (["--tunnel", "lan"], ["key", "list"]),
        (["--go-public"], ["serve"]),
        (["--show-qr"], ["key", "list"]),
    ],
)
def test_a_tray_flag_before_a_command_is_a_usage_error(
    before: list[str], command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*before, *command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, "one line, not the top-level usage"
    assert f"{before[0]} before `{command[0]}` would do nothing" in err
    if command == ["serve"] and before[0] != "--go-public":
        # serve takes every setting flag: the same ones after its name are the fix.
        assert f"run `lmgate serve {' '.join(before)}`" in err
    else:
        # Pointing at the command's own help, not at a spelling that may not exist for it.
        assert f"`lmgate {' '.join(command)} --help` lists those it takes" in err


def test_without_a_desktop_the_flags_reach_the_headless_gateway(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "flags.toml"
    config.write_text('[upstream]\nurl = "http://127.0.0.1:9431"\n', encoding="utf-8")
    gone = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "LMGATE_CONFIG", "LMGATE_UPSTREAM_URL")
    headless = {k: v for k, v in env.vars.items() if k not in gone}
    proc = subprocess.Popen(
        [LMGATE, "--port", "0", "--config", str(config)],
        env=headless,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not any("Press Ctrl-C" in line for line in seen) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        said = "".join(seen)
        assert said.startswith("No desktop display here: running headless"), said
        match = re.search(r"Listening on (http://127\.0\.0\.1:(\d+))", said)
        assert match is not None, said
        assert match.group(2) != "8787", "--port 0 did not reach the gateway"
        assert "http://127.0.0.1:9431" in said, "--config did not reach the gateway"
        status, _ = curl(match.group(1) + "/healthz")
        assert status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_without_a_desktop_an_explicit_tunnel_flag_is_not_dropped(env: Env) -> None:
    # A plain headless launch stays private; `--tunnel ngrok` asks for the tunnel, which here
    # fails as it should (no agent installed, and LM Gate never downloads one).
    gone = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    headless = {k: v for k, v in env.vars.items() if k not in gone}
    result = subprocess.run(
        [LMGATE, "--port", "0", "--tunnel", "ngrok"],
        env={**headless, "PATH": "/usr/bin:/bin"},  # no ngrok agent anywhere on it
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The ngrok agent is not installed" in result.stderr
