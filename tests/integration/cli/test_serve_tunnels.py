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


def test_a_cloudflare_quick_tunnel_from_serve_streams_chats_and_leaves_no_agent(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    record = tmp_path / "cloudflared.jsonl"
    variables = agent_env(env, lmstudio, certificate, "fake_cloudflared")
    variables.update(
        {"FAKE_CLOUDFLARED_RECORD": str(record), "FAKE_CLOUDFLARED_CLIENT_ADDRESS": CLIENT}
    )
    key = env.run("key", "create", "laptop").stdout.strip()
    serve = Serve(variables, "--tunnel", "cloudflare-quick")
    try:
        url = serve.read_until(r"Public URL:\s+(https://127\.0\.0\.1:\d+)").group(1)
        serve.read_until(r"Warning:\s+Cloudflare quick tunnels are for trying things out")
        streams = serve.read_until(r"Streams: first chunk after \d+ ms, largest gap (\d+) ms")
        assert 50 <= int(streams.group(1)) < 1000
        assert chat_through(url, key, certificate[0])
        checked = subprocess.run(
            [LMGATE, "check", url, key],
            capture_output=True,
            text=True,
            timeout=90,
            env=variables,
        )
        assert re.search(r"streams through.*largest gap", checked.stdout), checked.stdout
        (pid,) = started_pids(record)
        assert not gone(pid)
    finally:
        said = serve.stop()
    assert f"client={CLIENT}" in said or CLIENT in said, said
    assert key not in said
    time.sleep(0.3)
    assert gone(pid), "the agent outlived serve"


def test_a_buffering_tunnel_is_reported_by_serve_and_by_check(
    env: Env, lmstudio: FakeLMStudio, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    variables = agent_env(env, lmstudio, certificate, "fake_cloudflared")
    variables["FAKE_CLOUDFLARED_BUFFER"] = "1"
    key = env.run("key", "create", "laptop").stdout.strip()
    serve = Serve(variables, "--tunnel", "cloudflare-quick")
    try:
        url = serve.read_until(r"Public URL:\s+(https://\S+)").group(1)
        serve.read_until(r"delivers streamed answers in one piece")
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
    variables = agent_env(env, lmstudio, certificate, "fake_tailscale")
    variables.update(
        {
            "FAKE_TAILSCALE_RECORD": str(record),
            "FAKE_TAILSCALE_DNS_NAME": "localhost.",
            "LMGATE_TUNNEL_TAILSCALE_HTTPS_PORT": str(port),
        }
    )
    key = env.run("key", "create", "phone").stdout.strip()
    serve = Serve(variables, "--tunnel", "tailscale-serve")
    try:
        url = serve.read_until(r"Public URL:\s+(https://\S+?)\s").group(1)
        assert url == f"https://localhost:{port}"
        serve.read_until(r"Streams: first chunk after")
        assert chat_through(url, key, certificate[0])
    finally:
        serve.stop()
    argvs = [json.loads(line).get("argv", []) for line in record.read_text().splitlines()]
    assert not any("--bg" in argv for argv in argvs)
    time.sleep(0.3)
    assert all(gone(pid) for pid in started_pids(record)), "the tailscale CLI outlived serve"
