"""`lmgate serve --tunnel ngrok|lan` and `lmgate tunnel set-token`, as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import LMGATE, Env, curl

AGENT = str(Path(__file__).parent / "fake_ngrok" / "ngrok")
TOKEN = "2fakeAuthToken_" + "abc123XYZ" * 4


def serve_until_public(
    env: Env, *args: str, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str, list[str]]:
    proc = subprocess.Popen(
        [LMGATE, "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env.vars, **(extra or {})},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    text = "".join(lines)
    match = re.search(r"Public URL:  (\S+)", text)
    assert match, text + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
    return proc, match.group(1), lines


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def test_serve_with_lan_prints_url_pairing_and_warning(env: Env) -> None:
    key = env.run("key", "create", "laptop").stdout.strip()
    proc, url, lines = serve_until_public(
        env, "--tunnel", "lan", extra={"LMGATE_TUNNEL_LAN_ADDRESS": "127.0.0.2"}
    )
    text = "".join(lines)
    assert re.fullmatch(r"http://127\.0\.0\.2:\d+", url)
    assert "not encrypted" in text
    pairing = re.search(r"Pairing URL: (\S+)/#([A-Z2-7]{24})", text)
    assert pairing and pairing.group(1) == url
    assert "\u2588" in text or "##" in text  # the terminal QR code
    assert curl(url + "/v1/models", "-H", f"Authorization: Bearer {key}")[0] == 502
    status, body = curl(
        url + "/pair",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"code": pairing.group(2), "device_name": "phone"}),
    )
    assert status == 200 and json.loads(body)["token"]
    stop(proc)


def test_serve_with_ngrok_goes_public_and_leaves_no_agent(env: Env, tmp_path: Path) -> None:
    stored = env.run("tunnel", "set-token", stdin=TOKEN + "\n")
    assert stored.returncode == 0, stored.stderr
    assert TOKEN not in stored.stdout + stored.stderr
    record = tmp_path / "agent.jsonl"
    proc, url, _ = serve_until_public(
        env,
        "--tunnel",
        "ngrok",
        extra={"LMGATE_TUNNEL_NGROK_PATH": AGENT, "FAKE_NGROK_RECORD": str(record)},
    )
    agent_pid = next(
        json.loads(line)["pid"] for line in record.read_text().splitlines() if '"start"' in line
    )
    assert TOKEN not in Path(f"/proc/{agent_pid}/cmdline").read_text()
    assert curl(url + "/healthz")[0] == 200
    out, err = stop(proc)
    assert "Stopped." in out
    assert TOKEN not in out + err
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(agent_pid, 0)


def test_serve_with_ngrok_but_no_token_explains(env: Env) -> None:
    result = env.run(
        "serve", "--port", "0", "--tunnel", "ngrok", extra={"LMGATE_TUNNEL_NGROK_PATH": AGENT}
    )
    assert result.returncode == 1
    assert "lmgate tunnel set-token" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_go_public_in_dev_mode(env: Env) -> None:
    result = env.run(
        "serve",
        "--port",
        "0",
        "--tunnel",
        "lan",
        extra={"LMGATE_AUTH_DEV_MODE": "true", "LMGATE_TUNNEL_LAN_ADDRESS": "127.0.0.2"},
    )
    assert result.returncode == 2
    assert "refuses to open a tunnel" in result.stderr


def test_set_token_checks_the_shape(env: Env) -> None:
    result = env.run("tunnel", "set-token", stdin="not a token\n")
    assert result.returncode == 1
    assert "does not look like an ngrok authtoken" in result.stderr
    assert not (env.data.parent / "secrets" / "ngrok-authtoken").exists()
    assert env.run("tunnel", "set-token", stdin=TOKEN + "\n").returncode == 0
    stored = env.data.parent / "secrets" / "ngrok-authtoken"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert env.run("tunnel", "delete-token").returncode == 0
    assert not stored.exists()
