"""The installed ``lmgate`` command, run as a user would, in subprocesses: the CLI and a running
``lmgate serve`` share the database, so a key made or revoked by one is seen by the other."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LMGATE, Env, curl, start_serve
from tests.integration.cli.test_cli_tunnel import serve_on_a_terminal, stop_terminal
from tray_app import __version__


def bearer(token: str) -> list[str]:
    return ["-H", f"Authorization: Bearer {token}"]


@pytest.fixture
def serve(env: Env) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, url = start_serve(env.vars)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)  # serve says little: its pipes never fill
    assert proc.stdout is not None and proc.stderr is not None
    # Through the pipes' file objects, not communicate(): its raw reads would miss the lines
    # start_serve's readline has already buffered after the address.
    with proc.stdout, proc.stderr:
        out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err
    return out, err


def test_version() -> None:
    result = subprocess.run([LMGATE, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == f"lmgate {__version__}"


def test_serve_help() -> None:
    result = subprocess.run([LMGATE, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in (
        "--port",
        "--host",
        "--upstream",
        "--config",
        "--heartbeat",
        "--idle-timeout",
        "--secret-store",
        "--data-dir",
    ):
        assert flag in result.stdout
    assert "lmgate key create" in result.stdout


@pytest.mark.parametrize(
    ("args", "extra", "expected"),
    [
        (
            ["serve", "--port", "abc"],
            {},
            "config error: server.port (from command line): must be an integer",
        ),
        (
            ["serve", "--upstream", "localhost:1234"],
            {},
            "config error: upstream.url (from command line)",
        ),
        (
            ["serve"],
            {"LMGATE_SERVER_HOST": "not an ip"},
            "config error: server.host (from LMGATE_SERVER_HOST)",
        ),
        (["serve", "--config", "BADFILE"], {}, "config error: config file"),
        (
            ["serve"],
            {"LMGATE_AUTH_DEV_MODE": "1", "LMGATE_SERVER_HOST": "0.0.0.0"},
            "config error: auth.dev_mode",
        ),
        (["token", "create", "x", "--ttl", "soon"], {}, "--ttl: must be a duration"),
        (["token", "create", "x", "--scope", "admin"], {}, "--scope: unknown scope admin"),
        (["key", "revoke", "nope"], {}, "no API key with ID 'nope'"),
        (["token", "revoke", "abc"], {}, "at least 6 characters"),
    ],
)
def test_invalid_input_is_one_line_and_exit_2(
    env: Env, tmp_path: Path, args: list[str], extra: dict[str, str], expected: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    args = [str(bad) if a == "BADFILE" else a for a in args]
    result = env.run(*args, extra=extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lmgate: ")
    assert expected in lines[0]
    # A setting's problem is a config error; a typed ID, scope or duration is just named.
    assert ("config error" in lines[0]) == expected.startswith("config error: "), lines[0]
    assert "Traceback" not in result.stderr


def test_without_a_keyring_secret_commands_fail_with_advice(env: Env) -> None:
    no_keyring = {
        "LMGATE_SECRETS_STORE": "keyring",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }
    for args in (
        ["token", "create", "phone"],
        ["keys", "rotate"],
        ["secret", "set", "lmstudio-api-token"],
    ):
        result = env.run(*args, extra=no_keyring, stdin="x\n")
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "No usable OS keyring" in lines[0] and "--secret-store file" in lines[0]
    assert not (env.data.parent / "secrets").exists(), "nothing may fall back to a file"


def test_serve_without_a_keyring_runs_with_a_one_run_signing_key(env: Env) -> None:
    key = env.run("key", "create", "script").stdout.strip()
    no_keyring = {
        **env.vars,
        "LMGATE_SECRETS_STORE": "keyring",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }
    proc, _ = start_serve(no_keyring)  # waits for the address, however loaded the machine
    out, _ = stop(proc)
    assert "No usable OS keyring" in out
    assert "in memory for this run only" in out
    assert key not in out


def test_keys_and_tokens_from_the_cli_work_and_revoke_live(
    env: Env, serve: tuple[subprocess.Popen[str], str]
) -> None:
    proc, url = serve
    created = env.run("key", "create", "laptop", "--scope", "models")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"lmg_[A-Za-z0-9_-]{43}", key)
    assert "shown only now" in created.stderr

    token_run = env.run("token", "create", "phone", "--ttl", "1h", "--scope", "models")
    assert token_run.returncode == 0, token_run.stderr
    token = token_run.stdout.strip()
    assert token.count(".") == 2

    for credential in (key, token):
        status, body = curl(url + "/v1/models", *bearer(credential))
        # Authenticated; LM Studio is simply not running.
        assert (status, json.loads(body)["error"]["code"]) == (502, "upstream_unreachable"), body
    status, body = curl(url + "/v1/models", "-H", f"X-API-Key: {key}")
    assert (status, json.loads(body)["error"]["code"]) == (502, "upstream_unreachable"), body

    listed = env.run("key", "list").stdout
    key_id = re.search(r"^([0-9a-f]{12})\s+laptop", listed, re.M)
    assert key_id, listed
    assert key not in listed
    tokens = env.run("token", "list").stdout
    jti = re.search(r"^([0-9a-f]{24})\s+phone", tokens, re.M)
    assert jti, tokens
    assert token not in tokens

    assert env.run("key", "revoke", key_id.group(1)).returncode == 0
    assert env.run("token", "revoke", jti.group(1)[:8]).returncode == 0
    time.sleep(0.7)  # the server notices the CLI's change within half a second
    status, body = curl(url + "/v1/models", *bearer(key))
    assert (status, json.loads(body)["error"]["code"]) == (401, "api_key_revoked")
    status, body = curl(url + "/v1/models", *bearer(token))
    assert (status, json.loads(body)["error"]["code"]) == (401, "token_revoked")
    out, err = stop(proc)
    for secret in (key, token):
        assert secret not in out + err


def test_pairing_from_the_cli(env: Env, serve: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = serve
    paired = env.run("pair", "--device", "Anna's phone", "--url", url)
    assert paired.returncode == 0, paired.stderr
    match = re.search(r"Pairing URL: (\S+)/#([A-Z2-7]{24})", paired.stdout)
    assert match and match.group(1) == url
    assert "\u2588" in paired.stdout or "#" in paired.stdout  # the terminal QR code
    code = match.group(2)
    status, body = curl(
        url + "/pair",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"code": code, "device_name": "ignored"}),
    )
    assert status == 200, body
    device_token = json.loads(body)["token"]
    assert json.loads(body)["device_name"] == "Anna's phone"
    status, _ = curl(url + "/v1/models", *bearer(device_token))
    assert status == 502
    again, _ = curl(
        url + "/pair", "-H", "Content-Type: application/json", "-d", json.dumps({"code": code})
    )
    assert again == 401

    devices = env.run("device", "list").stdout
    device_id = re.search(r"^([0-9a-f]{12})\s+Anna's phone", devices, re.M)
    assert device_id, devices
    assert env.run("device", "revoke", device_id.group(1)).returncode == 0
    time.sleep(0.7)
    status, body = curl(url + "/v1/models", *bearer(device_token))
    assert (status, json.loads(body)["error"]["code"]) == (401, "token_revoked")
    stop(proc)


def test_usage_is_counted_per_caller(env: Env, serve: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = serve
    key = env.run("key", "create", "counter").stdout.strip()
    for _ in range(3):
        curl(url + "/v1/models", *bearer(key))
    stop(proc)  # the last batch is written at shutdown
    usage = env.run("usage")
    assert usage.returncode == 0
    row = re.search(r"^key:[0-9a-f]{12}\s+counter\s+3\s+0\s+0\s", usage.stdout, re.M)
    assert row, usage.stdout


def test_rotating_the_signing_key_invalidates_tokens(
    env: Env, serve: tuple[subprocess.Popen[str], str]
) -> None:
    proc, url = serve
    token = env.run("token", "create", "t", "--scope", "models").stdout.strip()
    assert curl(url + "/v1/models", *bearer(token))[0] == 502
    stop(proc)
    rotated = env.run("keys", "rotate")
    assert rotated.returncode == 0 and "invalid" in rotated.stdout
    proc2, url2 = start_serve(env.vars)
    status, body = curl(url2 + "/v1/models", *bearer(token))
    assert status == 401
    assert json.loads(body)["error"]["code"] in {"invalid_token", "token_revoked"}
    stop(proc2)


def test_serve_without_keys_on_a_pipe_says_how_to_make_one(
    serve: tuple[subprocess.Popen[str], str],
) -> None:
    proc, _ = serve
    out, _ = stop(proc)
    assert "none yet; create one with `lmgate key create NAME`" in out
    assert "lmg_" not in out


def test_serve_stops_cleanly_and_logs_json(
    env: Env, serve: tuple[subprocess.Popen[str], str]
) -> None:
    proc, url = serve
    status, body = curl(url + "/healthz")
    assert (status, body) == (200, '{"status": "ok"}')
    assert curl(url + "/v1/models")[0] == 401
    out, err = stop(proc)
    assert "Stopped." in out
    assert "Traceback" not in err
    access = [json.loads(line) for line in err.splitlines() if '"lmgate.access"' in line]
    assert [a["status"] for a in access] == [200, 401]


def test_serve_reports_a_busy_port(env: Env, serve: tuple[subprocess.Popen[str], str]) -> None:
    _, url = serve
    result = env.run("serve", "--port", url.rsplit(":", 1)[1])
    assert result.returncode == 2
    assert "LM Gate is running already" in result.stderr  # the port's holder is LM Gate
    assert "Traceback" not in result.stderr


def test_a_failed_start_on_a_terminal_makes_no_key_so_the_next_start_shows_one(
    env: Env, serve: tuple[subprocess.Popen[str], str]
) -> None:
    running, url = serve  # on a pipe: it makes no key, and it holds the port
    controller, terminal = pty.openpty()
    busy = subprocess.Popen(
        [LMGATE, "serve", "--port", url.rsplit(":", 1)[1]],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        text=True,
        env=env.vars,
    )
    os.close(terminal)
    try:
        _, err = busy.communicate(timeout=30)
    finally:
        os.close(controller)
    assert busy.returncode == 2 and "LM Gate is running already" in err
    # It used to make the owner key before binding: a key nobody saw, and none shown later.
    assert not re.search(r"^[0-9a-f]{12}\s+owner", env.run("key", "list").stdout, re.M)
    stop(running)
    proc, controller, text = serve_on_a_terminal(env)
    try:
        assert re.search(r"API key:     lmg_\S+", text), text
    finally:
        stop_terminal(proc, controller)


def test_secret_set_stores_the_lm_studio_token(env: Env) -> None:
    result = env.run("secret", "set", "lmstudio-api-token", stdin="sk-lm-abc123\n")
    assert result.returncode == 0, result.stderr
    stored = env.data.parent / "secrets" / "lmstudio-api-token"
    assert stored.read_text() == "sk-lm-abc123"
    assert oct(stored.stat().st_mode & 0o777) == "0o600"
    assert "sk-lm-abc123" not in result.stdout + result.stderr
    # `serve` reads the token once: a running one would go on with the old token, unsaid.
    assert "restart a running `lmgate serve` to use it" in result.stdout


def silent_address(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"{host}:{port}"


def silent_has_a_connection(listener: socket.socket) -> bool:
    """Whether someone has connected (a listening socket reads as ready then)."""
    readable, _, _ = select.select([listener], [], [], 0)
    return bool(readable)


def test_sigterm_while_lm_studio_is_probed_stops_gracefully(env: Env) -> None:
    with socket.socket() as silent:  # accepts, never answers: the start's probe waits 5 s
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        serve = subprocess.Popen(
            [LMGATE, "serve", "--port", "0", "--upstream", f"http://{silent_address(silent)}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env.vars,
        )
        try:
            deadline = time.monotonic() + 20
            while not silent_has_a_connection(silent) and time.monotonic() < deadline:
                time.sleep(0.05)
            serve.send_signal(signal.SIGTERM)
            out, err = serve.communicate(timeout=30)
        finally:
            if serve.poll() is None:
                serve.kill()
    # The handlers used to be installed only after the probe: SIGTERM killed it mid-start.
    assert serve.returncode == 0, (serve.returncode, err)
    assert out.rstrip().endswith("Stopped."), out


def test_secret_set_takes_an_upstreams_token_and_refuses_other_names(env: Env) -> None:
    stored = env.run("secret", "set", "upstream-token-desk", stdin="sk-desk-123\n")
    assert stored.returncode == 0, stored.stderr
    assert "Stored upstream-token-desk" in stored.stdout
    assert "uses it from its next probe of that upstream" in stored.stdout
    listed = env.run("upstream", "list")
    refused = env.run("secret", "set", "signing-key", stdin="x\n")
    assert refused.returncode == 2
    assert "'signing-key' is not a secret LM Gate keeps" in refused.stderr
    assert "upstream-token-NAME" in refused.stderr
    assert "sk-desk-123" not in stored.stdout + stored.stderr + listed.stdout
