"""`lmgate serve --tunnel ngrok|lan` and `lmgate tunnel set-token`, as real processes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import FAKE_NGROK_AGENT, LMGATE, Env, curl

AGENT = str(FAKE_NGROK_AGENT)
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


def serve_on_a_terminal(
    env: Env, *args: str, extra: dict[str, str] | None = None, timeout: float = 30
) -> tuple[subprocess.Popen[bytes], int, str]:
    """`lmgate serve` with stdout (and stdin) on a pseudo-terminal, read until it is ready."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [LMGATE, "serve", "--port", "0", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env={**env.vars, **(extra or {})},
    )
    os.close(terminal)
    text = read_terminal(controller, until="Press Ctrl-C", timeout=timeout)
    return proc, controller, text


def read_terminal(controller: int, *, until: str | None, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        data += chunk
        if until is not None and until.encode() in data:
            break
    return data.decode(errors="replace").replace("\r\n", "\n")


def stop_terminal(proc: subprocess.Popen[bytes], controller: int) -> str:
    proc.send_signal(signal.SIGINT)
    rest = read_terminal(controller, until=None, timeout=30)
    _, err = proc.communicate(timeout=30)
    os.close(controller)
    assert proc.returncode == 0, err
    return rest


PAIRING_URL = re.compile(r"Pairing URL: (\S+)/#([A-Z2-7]{24})")
CODE_SHAPED = re.compile(r"(?<![A-Za-z0-9])[A-Z2-7]{24}(?![A-Za-z0-9])")
QR_BLOCKS = ("\u2588", "\u2580", "\u2584")


def lan(env: Env, tmp_path: Path) -> dict[str, str]:
    return {"LMGATE_TUNNEL_PROVIDER": "lan", "LMGATE_TUNNEL_LAN_ADDRESS": "127.0.0.2"}


def ngrok(env: Env, tmp_path: Path) -> dict[str, str]:
    assert env.run("tunnel", "set-token", stdin=TOKEN + "\n").returncode == 0
    return {"LMGATE_TUNNEL_PROVIDER": "ngrok", "LMGATE_TUNNEL_NGROK_PATH": AGENT}


PROVIDERS = {"lan": lan, "ngrok": ngrok}


@pytest.mark.parametrize("provider", PROVIDERS.values(), ids=PROVIDERS.keys())
class TestSecretsOnlyToATerminal:
    """`serve` output often ends up in journald or a log file: the one-time pairing code, its
    QR code and a first API key are shown only on a terminal."""

    def test_piped_output_says_how_to_pair_and_holds_no_secret(
        self, provider: Callable[[Env, Path], dict[str, str]], env: Env, tmp_path: Path
    ) -> None:
        proc, url, lines = serve_until_public(env, extra=provider(env, tmp_path))
        out, err = stop(proc)
        text = "".join(lines) + out + err
        assert f"Pair a phone: run `lmgate pair --url {url}` in a terminal" in text
        assert "Pairing URL" not in text and "/#" not in text
        assert CODE_SHAPED.search(text) is None, text
        assert not any(block in text for block in QR_BLOCKS)
        assert "lmg_" not in text and "API key:" not in text
        assert "none yet; create one with `lmgate key create NAME`" in text

    def test_a_terminal_is_shown_the_pairing_code_and_first_key(
        self, provider: Callable[[Env, Path], dict[str, str]], env: Env, tmp_path: Path
    ) -> None:
        proc, controller, text = serve_on_a_terminal(env, extra=provider(env, tmp_path))
        try:
            url = re.search(r"Public URL:  (\S+)", text)
            pairing = PAIRING_URL.search(text)
            assert url and pairing, text
            assert pairing.group(1) == url.group(1)
            assert any(block in text for block in QR_BLOCKS)
            key = re.search(r"API key:     (lmg_\S+)", text)
            assert key, text
            assert (
                curl(url.group(1) + "/v1/models", "-H", f"Authorization: Bearer {key[1]}")[0] == 502
            )  # authenticated; the fake upstream at :9 is down
            status, body = curl(
                url.group(1) + "/pair",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps({"code": pairing.group(2), "device_name": "phone"}),
            )
            assert status == 200 and json.loads(body)["token"]
        finally:
            stop_terminal(proc, controller)


def test_serve_with_lan_prints_url_and_warning(env: Env) -> None:
    key = env.run("key", "create", "laptop").stdout.strip()
    proc, url, lines = serve_until_public(
        env, "--tunnel", "lan", extra={"LMGATE_TUNNEL_LAN_ADDRESS": "127.0.0.2"}
    )
    text = "".join(lines)
    assert re.fullmatch(r"http://127\.0\.0\.2:\d+", url)
    assert "not encrypted" in text
    assert curl(url + "/v1/models", "-H", f"Authorization: Bearer {key}")[0] == 502
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
