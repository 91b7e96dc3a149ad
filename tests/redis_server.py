"""A real redis-server for tests: on 127.0.0.1 and a free port, in a temporary directory,
nothing saved to disk. One per session; each test starts from an empty database, and an
outage test may stop it and start it again on the same port.

Without redis-server the tests that need it are skipped, unless LMGATE_REQUIRE_REDIS=1 (as CI
sets it), where a missing server is a failure: a skipped limit test proves nothing.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port, missing_tool

START_SECONDS = 10.0


def _ask(port: int, command: bytes, timeout: float = 1.0) -> bytes:
    """One inline command on a connection of its own, and the first line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        answer = b""
        while not answer.endswith(b"\r\n"):
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
        return answer


class RedisServer:
    def __init__(self, binary: str, directory: Path) -> None:
        self._binary = binary
        self._directory = directory
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert not self.running
        self._process = subprocess.Popen(
            [
                self._binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._directory),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._directory,
        )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            try:
                if _ask(self.port, b"PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Stopped as a crash would: its data (kept in memory only) is gone."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait(5)

    def pause(self) -> None:
        """Hung, not gone: connections open, nothing answers (SIGSTOP)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def flushall(self) -> None:
        assert _ask(self.port, b"FLUSHALL").startswith(b"+OK")

    def client(self) -> redis.Redis:
        """A plain client, for tests that look at what is kept and for how long."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing_tool("redis-server", "LMGATE_REQUIRE_REDIS")
    with tempfile.TemporaryDirectory(prefix="lmgate-redis-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's redis-server, running and empty."""
    if not redis_server_session.running:
        redis_server_session.start()  # a test before stopped it
    redis_server_session.flushall()
    return redis_server_session
