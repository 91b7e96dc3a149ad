"""What the stop-signal tests of the tray and of headless `lmgate` share: a home that can go
public with the fake ngrok agent, a stream through the tunnel, and the looks afterwards (the
agent's process, the usage LM Gate recorded)."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tests.helpers import FAKE_NGROK_AGENT, Env, free_port

TOKEN = "2fakeAuthToken_" + "stopSIGNALS" * 4
MODEL = "qwen2.5-7b-instruct"


@dataclass
class PublicHome:
    """An LM Gate home with an ngrok authtoken and an API key, going public at a known URL
    (the fake agent honours a "reserved" loopback URL)."""

    env: Env
    key: str
    public_url: str
    local_url: str  # the gateway's own port: its grace is for answers given there (a tunnel's
    # connections end with the agent, which goes first)
    record: Path
    vars: dict[str, str]

    def agent_pid(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.record.exists():
                for line in self.record.read_text().splitlines():
                    entry = json.loads(line)
                    if "start" in line and "pid" in entry:
                        return int(entry["pid"])
            time.sleep(0.05)
        raise AssertionError("the fake agent never started")

    def wait_public(self, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"lmgate ended early ({proc.returncode})"
            try:
                if status_of(self.public_url + "/healthz") == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.public_url} never answered")

    def usage(self) -> dict[str, tuple[int, int]]:
        """(requests, completion tokens) per credential's name, as `lmgate usage` reads them
        from the database the stopped LM Gate left."""
        result = self.env.run("usage", "--csv")
        assert result.returncode == 0, result.stderr
        return {
            row["name"]: (int(row["requests"]), int(row["completion_tokens"]))
            for row in csv.DictReader(io.StringIO(result.stdout))
        }


def public_home(env: Env, tmp_path: Path, upstream_url: str, grace: float) -> PublicHome:
    stored = env.run("tunnel", "set-token", stdin=TOKEN + "\n")
    assert stored.returncode == 0, stored.stderr
    made = env.run("key", "create", "streamer", "--scope", "chat", "--scope", "models")
    assert made.returncode == 0, made.stderr
    key = next(word for word in made.stdout.split() if word.startswith("lmg_"))
    public_url = f"http://127.0.0.1:{free_port()}"
    local_port = free_port()
    record = tmp_path / "agent.jsonl"
    variables = {
        **env.vars,
        "LMGATE_UPSTREAM_URL": upstream_url,
        "LMGATE_SERVER_PORT": str(local_port),
        "LMGATE_SERVER_SHUTDOWN_GRACE": str(grace),
        "LMGATE_TUNNEL_PROVIDER": "ngrok",
        "LMGATE_TUNNEL_NGROK_PATH": str(FAKE_NGROK_AGENT),
        "LMGATE_TUNNEL_NGROK_DOMAIN": public_url,
        "FAKE_NGROK_RECORD": str(record),
    }
    return PublicHome(env, key, public_url, f"http://127.0.0.1:{local_port}", record, variables)


def status_of(url: str) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        connection.request("GET", parts.path)
        return connection.getresponse().status
    finally:
        connection.close()


@dataclass
class Stream:
    """One streamed chat answer through the tunnel, read on a thread of its own."""

    url: str
    key: str
    events: list[str] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    first_event: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.first_event.wait(15), f"no first event ({self.status}, {self.error})"
        return self

    def _read(self) -> None:
        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        body = {
            "model": MODEL,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Hi"}],
        }
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body),
                headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            self.status = response.status
            while line := response.readline():
                text = line.decode().strip()
                if text.startswith("data:"):
                    self.events.append(text[5:].strip())
                    self.first_event.set()
        except (OSError, http.client.HTTPException) as exc:
            self.error = repr(exc)
        finally:
            connection.close()
            self.first_event.set()

    def join(self, timeout: float = 30.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream never ended"

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def ended_with_error(self) -> bool:
        """LM Gate's SSE error event, what a stream cut off by the end of the grace gets."""
        return any('"error"' in event for event in self.events[-2:])


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
