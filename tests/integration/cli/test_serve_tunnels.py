"""`lmgate serve --tunnel cloudflare-quick|tailscale-serve` as real processes, with the fake
agents on PATH and their public side speaking HTTPS with a test certificate (the one part of
the real services the fakes add: the edge ends TLS). `serve` and `lmgate check` trust it through
SSL_CERT_FILE, as they would trust a real certificate through the system's store.

What runs is the whole path a user takes: the declared flag, the provider made from the config,
the agent found on PATH and proven, the URL proven, the stream check printed, a chat with the
official client through the URL, and no agent left after the stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fake_lmstudio import FakeLMStudio, fake_on_a_thread
from tests.helpers import LMGATE, REPO_ROOT, Env

FAKES = REPO_ROOT / "tests"
CLIENT = "203.0.113.9"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def lmstudio() -> Iterator[FakeLMStudio]:
    yield from fake_on_a_thread()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def agent_env(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], agent_dir: str
) -> dict[str, str]:
    cert, key = certificate
    return {
        **env.vars,
        "PATH": os.pathsep.join([str(FAKES / agent_dir), os.environ["PATH"]]),
        "LMGATE_UPSTREAM_URL": lmstudio.url,
        "SSL_CERT_FILE": str(cert),
        "FAKE_AGENT_TLS_CERT": str(cert),
        "FAKE_AGENT_TLS_KEY": str(key),
    }


class Serve:
    def __init__(self, variables: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [LMGATE, "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=variables,
        )
        self.lines: list[str] = []

    def read_until(self, pattern: str, seconds: float = 40.0) -> re.Match[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in self.lines:
                if found := re.search(pattern, line):
                    return found
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"no {pattern!r} in:\n{''.join(self.lines)}{err}")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=40)
        assert self.proc.returncode == 0, err
        return "".join(self.lines) + out + err


def started_pids(record: Path) -> list[int]:
    pids = []
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        if isinstance(entry, dict) and isinstance(entry.get("pid"), int):
            pids.append(entry["pid"])
    return pids


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" in status.read_text()


def chat_through(url: str, key: str, cert: Path) -> str:
    client = openai.OpenAI(
        base_url=url + "/v1",
        api_key=key,
        http_client=openai.DefaultHttpx2Client(verify=ssl.create_default_context(cafile=str(cert))),
    )
    with client:
        answer = client.chat.completions.create(
            model="qwen2.5-7b-instruct", messages=[{"role": "user", "content": "hi"}]
        )
    return answer.choices[0].message.content or ""


def test_a_quick_tunnel_name_that_is_not_cloudflares_is_refused_by_serve(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # The fake's quick tunnel is at 127.0.0.1:PORT, which no real quick tunnel is: serve, with
    # the real default, refuses to hand that URL to phones, and leaves no agent behind.
    record = tmp_path / "cloudflared.jsonl"
    variables = agent_env(env, lmstudio, certificate, "fake_cloudflared")
    variables["FAKE_CLOUDFLARED_RECORD"] = str(record)
    done = subprocess.run(
        [LMGATE, "serve", "--port", "0", "--tunnel", "cloudflare-quick"],
        capture_output=True,
        text=True,
        timeout=90,
        env=variables,
    )
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "unexpected address" in said and "trycloudflare.com" in said, said
    assert "Public URL:" not in said
    (pid,) = started_pids(record)
    assert gone(pid), "the agent outlived serve"


def tailscale_env(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], record: Path, port: int
) -> dict[str, str]:
    variables = agent_env(env, lmstudio, certificate, "fake_tailscale")
    variables.update(
        {
            "FAKE_TAILSCALE_RECORD": str(record),
            "FAKE_TAILSCALE_DNS_NAME": "localhost.",
            "FAKE_TAILSCALE_CLIENT_ADDRESS": CLIENT,
            "LMGATE_TUNNEL_TAILSCALE_HTTPS_PORT": str(port),
        }
    )
    return variables


def test_a_buffering_tunnel_is_reported_by_serve_and_by_check(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    variables = tailscale_env(env, lmstudio, certificate, tmp_path / "ts.jsonl", free_port())
    variables["FAKE_TAILSCALE_BUFFER"] = "1"
    key = env.run("key", "create", "laptop").stdout.strip()
    serve = Serve(variables, "--tunnel", "tailscale-serve")
    try:
        url = serve.read_until(r"Public URL:\s+(https://\S+?)\s").group(1)
        serve.read_until(r"delivers streamed answers in one piece.*use ngrok, Tailscale")
        checked = subprocess.run(
            [LMGATE, "check", url, key], capture_output=True, text=True, timeout=90, env=variables
        )
        assert checked.returncode != 0
        assert re.search(r"streams through.*one piece", checked.stdout), checked.stdout
    finally:
        serve.stop()


def test_tailscale_serve_from_serve_chats_over_the_machines_name_and_stops_the_cli(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    record = tmp_path / "tailscale.jsonl"
    port = free_port()
    variables = tailscale_env(env, lmstudio, certificate, record, port)
    key = env.run("key", "create", "phone").stdout.strip()
    serve = Serve(variables, "--tunnel", "tailscale-serve")
    try:
        url = serve.read_until(r"Public URL:\s+(https://\S+?)\s").group(1)
        assert url == f"https://localhost:{port}"
        streams = serve.read_until(r"Streams: first chunk after \d+ ms, largest gap (\d+) ms")
        assert 50 <= int(streams.group(1)) < 1000
        assert chat_through(url, key, certificate[0])
        checked = subprocess.run(
            [LMGATE, "check", url, key], capture_output=True, text=True, timeout=90, env=variables
        )
        assert re.search(r"streams through.*largest gap", checked.stdout), checked.stdout
    finally:
        said = serve.stop()
    assert CLIENT in said, "the client is the one the agent named"
    assert key not in said
    argvs = [json.loads(line).get("argv", []) for line in record.read_text().splitlines()]
    assert not any("--bg" in argv for argv in argvs)
    time.sleep(0.3)
    assert all(gone(pid) for pid in started_pids(record)), "the tailscale CLI outlived serve"


def test_serve_says_when_the_tunnel_comes_back_at_another_url() -> None:
    import io

    from tray_app.cli.main import _status_printer
    from tray_app.tunnel.manager import TunnelState, TunnelStatus

    out = io.StringIO()
    show = _status_printer(out)
    for state, url, message in [
        (TunnelState.PUBLIC, "https://a.trycloudflare.com", ""),
        (TunnelState.RECONNECTING, "https://a.trycloudflare.com", "the agent exited (code 1)"),
        (TunnelState.PUBLIC, "https://a.trycloudflare.com", ""),
        (TunnelState.RECONNECTING, "https://a.trycloudflare.com", "the agent exited (code 1)"),
        (TunnelState.PUBLIC, "https://b.trycloudflare.com", ""),
    ]:
        show(TunnelStatus(state, "cloudflare-quick", public_url=url, message=message, attempt=1))
    lines = out.getvalue().splitlines()
    assert lines[1] == "Tunnel:      reconnecting (attempt 1): the agent exited (code 1)"
    assert lines[2] == "Tunnel:      public at https://a.trycloudflare.com"
    assert lines[4].startswith("Public URL changed: https://b.trycloudflare.com (the old one")
    assert "lmgate pair --url https://b.trycloudflare.com" in lines[4]
