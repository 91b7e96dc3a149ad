"""A real nginx for tests, serving a site `lmgate deploy nginx` wrote: a self-signed
certificate, a private prefix directory, `nginx -t` first, then nginx in the foreground until
the test stops it (SIGQUIT: a graceful stop)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import missing_tool


def nginx_binary() -> str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        missing_tool("nginx", "LMGATE_REQUIRE_NGINX", " (tests/run.sh installs Debian's nginx)")
    return nginx


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for ``name`` and its key, valid for a day."""
    cert, key = directory / "test.crt", directory / "test.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nginx(prefix: Path, site: Path, port: int) -> Nginx:
    """nginx serving ``site`` from a private ``prefix``, once `nginx -t` passed it and it
    listens on ``port``."""
    nginx = nginx_binary()
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\n"
        "worker_processes 1;\nevents {}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n"
        f"  proxy_temp_path {prefix}/proxy;\n  include {site};\n}}\n"
    )
    tested = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert tested.returncode == 0, tested.stderr
    assert "syntax is ok" in tested.stderr
    process = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Nginx(process)
    try:
        _wait_for_port(port, process)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on {port} within {timeout} s")
