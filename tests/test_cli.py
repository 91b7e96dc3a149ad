"""The installed ``lmgate`` command, run as a user would, in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLIENT_KEY
from tray_app import __version__

LMGATE = str(Path(sys.executable).with_name("lmgate"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LMGATE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"lmgate {__version__}"


def test_serve_help() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    for flag in ("--port", "--host", "--upstream", "--config", "--heartbeat", "--idle-timeout"):
        assert flag in result.stdout
    assert "LMGATE_SECRET_GATEWAY_API_KEY" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--port", "abc"], {}, "server.port (from command line): must be an integer"),
        (["serve", "--upstream", "localhost:1234"], {}, "upstream.url (from command line)"),
        (["serve"], {"LMGATE_SERVER_HOST": "not an ip"}, "server.host (from LMGATE_SERVER_HOST)"),
        (["serve", "--config", "BADFILE"], {}, "config file"),
        (["serve"], {"LMGATE_SECRET_GATEWAY_API_KEY": "short"}, "at least 16 characters"),
    ],
)
def test_invalid_config_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    args = [str(bad) if a == "BADFILE" else a for a in args]
    result = run(*args, env={"LMGATE_CONFIG": str(tmp_path / "none.toml"), **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lmgate: config error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {
        **os.environ,
        "LMGATE_CONFIG": str(tmp_path / "none.toml"),
        "LMGATE_SECRET_GATEWAY_API_KEY": CLIENT_KEY,
        "LMGATE_UPSTREAM_URL": "http://127.0.0.1:9",
    }
    proc = subprocess.Popen(
        [LMGATE, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = ""
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"Listening on (http://127\.0\.0\.1:\d+)", line)
        if match:
            url = match.group(1)
            break
    assert url, "lmgate serve did not report its address"
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


def test_serve_runs_and_stops_cleanly_on_ctrl_c(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = served
    health = subprocess.run(
        ["curl", "-sS", url + "/healthz"], capture_output=True, text=True, timeout=10
    )
    assert health.stdout.strip() == '{"status": "ok"}'
    models = subprocess.run(
        ["curl", "-sS", url + "/v1/models", "-H", f"Authorization: Bearer {CLIENT_KEY}"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "not reachable at http://127.0.0.1:9" in models.stdout  # LM Studio is not running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Stopped." in out
    assert "Traceback" not in err
    assert CLIENT_KEY not in out + err
    access = [line for line in err.splitlines() if '"lmgate.access"' in line]
    assert len(access) == 2


def test_serve_reports_a_busy_port(
    served: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    _, url = served
    port = url.rsplit(":", 1)[1]
    result = run(
        "serve",
        "--port",
        port,
        env={
            "LMGATE_CONFIG": str(tmp_path / "none.toml"),
            "LMGATE_SECRET_GATEWAY_API_KEY": CLIENT_KEY,
        },
    )
    assert result.returncode == 2
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_key_is_not_printed_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LMGATE_CONFIG": str(tmp_path / "none.toml"),
        "LMGATE_UPSTREAM_URL": "http://127.0.0.1:9",
    }
    env.pop("LMGATE_SECRET_GATEWAY_API_KEY", None)
    proc = subprocess.Popen(
        [LMGATE, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert "not printed because this is not a terminal" in out
    assert "lmg_" not in out
