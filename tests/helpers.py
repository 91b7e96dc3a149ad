"""Small test helpers: raw HTTP over a socket (for paths a client library would normalise),
log capture, and authenticators with fixed principals."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.fakes import StaticKeyAuthenticator
from tray_app.identity.principal import Principal
from tray_app.logs import JsonFormatter


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def build_request(
    method: str, target: str, port: int, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    given = {name.lower() for name in headers or {}}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: 127.0.0.1:{port}")
    lines.append("Connection: close")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def raw_request(
    port: int, method: str, target: str, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> RawResponse:
    """Send a request exactly as written (no client-side normalisation) and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(method, target, port, headers, body))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    return _parse(data)


def raw_request_sync(
    port: int, method: str, target: str, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> RawResponse:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(build_request(method, target, port, headers, body))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return _parse(b"".join(chunks))


class LogCapture:
    """Collects everything the ``lmgate`` loggers write, formatted exactly as in production."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())
        self._logger = logging.getLogger("lmgate")
        self._old_level = self._logger.level

    def __enter__(self) -> LogCapture:
        self._logger.addHandler(self.handler)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self.handler)
        self._logger.setLevel(self._old_level)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["logger"] == "lmgate.access"]

    def wait_for_access(self, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access lines once there are ``count``: a line is written after its answer's last
        byte went out, so a client can hold the answer before the gateway has logged it."""
        deadline = time.monotonic() + timeout
        while len(lines := self.access()) < count:
            assert time.monotonic() < deadline, f"{len(lines)} access lines, wanted {count}"
            time.sleep(0.01)
        return lines


class FixedPrincipalAuthenticator:
    """Accepts one key and returns a given principal: exercises the identity layer's hooks."""

    def __init__(self, key: str, principal: Principal) -> None:
        self._inner = StaticKeyAuthenticator(key)
        self._principal = principal

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        self._inner.authenticate(headers, peer)
        return self._principal

    def still_valid(self, principal: Principal) -> bool:
        return principal is self._principal

    def check_state(self) -> None:
        pass  # no database behind it


def sse_events(body: bytes) -> list[str]:
    """The data lines of an SSE body, in order (comments excluded)."""
    return [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]


LMGATE = str(Path(sys.executable).with_name("lmgate"))


@dataclass
class Env:
    vars: dict[str, str]
    data: Path

    def run(
        self, *args: str, stdin: str | None = None, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LMGATE, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**self.vars, **(extra or {})},
            input=stdin,
        )


def cli_env(tmp_path: Path) -> Env:
    """A private LM Gate home: its own config path, data dir and file secret store."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
    variables.update(
        {
            "LMGATE_CONFIG": str(tmp_path / "none.toml"),
            "LMGATE_STORAGE_DATA_DIR": str(tmp_path / "data"),
            "LMGATE_SECRETS_STORE": "file",
            "LMGATE_SECRETS_FILE_DIR": str(tmp_path / "secrets"),
            "LMGATE_UPSTREAM_URL": "http://127.0.0.1:9",
        }
    )
    return Env(variables, tmp_path / "data")


def free_port() -> int:
    """A port nothing listens on now, for a server that cannot be told to pick its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def curl(url: str, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", url, *args],
        capture_output=True,
        text=True,
        timeout=15,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def publish_screenshot(path: Path, name: str) -> None:
    """With LMGATE_UPDATE_DOCS=1, copy a screenshot the tests made into docs/screenshots/,
    where the README shows it."""
    if os.environ.get("LMGATE_UPDATE_DOCS") == "1":
        import shutil

        target = REPO_ROOT / "docs" / "screenshots" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def start_serve(
    env: Mapping[str, str],
    *args: str,
    executable: str = LMGATE,
    stderr: Any = subprocess.PIPE,
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], str]:
    """Start `lmgate serve --port 0` and return it with the address it reports.

    Fails (instead of hanging) if the process exits or says nothing within ``timeout``."""
    import re

    proc = subprocess.Popen(
        [executable, "serve", "--port", "0", *args],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        match = re.search(r"Listening on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError("lmgate serve did not report its address")


# Tests live in subfolders by kind (unit, integration, security, ui, shipping); these are the two
# places they find from anywhere in that tree.
REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_NGROK_AGENT = Path(__file__).resolve().parent / "fake_ngrok" / "ngrok"


def photo_data_url(width: int = 8, height: int = 6, kind: str = "PNG") -> str:
    """A real image made by Pillow, as the data URL the phone page sends."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, kind)
    media = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[kind]
    return f"data:{media};base64," + base64.b64encode(buffer.getvalue()).decode()


def missing_tool(what: str, variable: str, hint: str = "") -> NoReturn:
    """A program some tests drive is not installed: skip them, or fail where CI must have it
    (``variable`` = 1, as tests/run.sh sets)."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{what} is required ({variable}=1){hint} but not installed")
    pytest.skip(f"{what} is not installed{hint}")
