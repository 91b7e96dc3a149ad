"""Every secret created during a run is absent from logs, the database files, the secrets
directory's other files, and the server process's argv."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import cli_env, curl, start_serve

LMGATE = str(Path(sys.executable).with_name("lmgate"))


def test_no_secret_in_logs_database_or_argv(tmp_path: Path) -> None:
    env = {**cli_env(tmp_path).vars, "LMGATE_LOG_LEVEL": "debug"}

    def cli(*args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [LMGATE, *args], capture_output=True, text=True, env=env, input=stdin, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    lmstudio_token = "sk-lm-" + os.urandom(12).hex()
    cli("secret", "set", "lmstudio-api-token", stdin=lmstudio_token + "\n")
    api_key = cli("key", "create", "script").strip()
    token = cli("token", "create", "laptop").strip()
    proc, url = start_serve(env)
    code = re.search(r"#([A-Z2-7]{24})", cli("pair", "--url", url)).group(1)  # type: ignore[union-attr]
    status, body = curl(
        url + "/pair",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"code": code, "device_name": "phone"}),
    )
    assert status == 200
    device_token = json.loads(body)["token"]
    for credential in (api_key, token, device_token, "lmg_wrong_" + "w" * 33):
        curl(url + "/v1/models", "-H", f"Authorization: Bearer {credential}")
        curl(url + f"/v1/models?key={credential}")
        curl(
            url + "/v1/chat/completions",
            "-H",
            f"X-API-Key: {credential}",
            "-d",
            json.dumps({"model": "m", "messages": [{"role": "user", "content": credential}]}),
        )
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
    environ_listing = Path(f"/proc/{proc.pid}/environ").read_bytes()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    time.sleep(0.1)

    signing_key = (tmp_path / "secrets" / "jwt-signing-key").read_text()
    secrets = {
        "api key": api_key,
        "token": token,
        "device token": device_token,
        "pairing code": code,
        "signing key": signing_key,
        "LM Studio token": lmstudio_token,
    }
    places = {"server stdout": out, "server stderr (JSON log)": err, "server argv": argv}
    data_dir = tmp_path / "data"
    # lmgate.db, its -wal and -shm, and the usage journal's files
    for path in data_dir.rglob("*"):
        if path.is_file():
            places[str(path.relative_to(data_dir))] = path.read_bytes().decode("latin-1")
    for name, secret in secrets.items():
        for place, text in places.items():
            assert secret not in text, f"the {name} leaked into {place}"
    # The LM Studio token lives only in its own 0600 file; the environment has none of them.
    for secret in secrets.values():
        assert secret.encode() not in environ_listing
    assert len(err.splitlines()) >= 12


def test_a_malformed_request_never_puts_its_bytes_in_the_log(tmp_path: Path) -> None:
    import socket

    env = cli_env(tmp_path).vars
    proc, url = start_serve(env)
    port = int(url.rsplit(":", 1)[1])
    secret = "lmg_" + os.urandom(16).hex()
    with socket.create_connection(("127.0.0.1", port)) as s:
        # A NUL byte makes aiohttp's parser refuse the request and, by default, log a
        # traceback quoting the header — here, a credential.
        s.sendall(
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\0\r\n"
            "\r\n".encode()
        )
        answer = s.recv(4096)
    assert answer.split(b" ")[1] == b"400"  # refused before any handler runs
    assert secret.encode() not in answer
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert secret not in err
    assert "Traceback" not in err
    (line,) = [json.loads(x) for x in err.splitlines() if '"bad_request"' in x]
    assert (line["logger"], line["status"], line["error"]) == ("lmgate.access", 400, "bad_request")
