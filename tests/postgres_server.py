"""A real PostgreSQL for tests (Debian's binaries): initdb into a temporary directory, on
127.0.0.1 and a free port, a password-authenticated role (scram-sha-256) so the URL carries a
password a test can look for, durability off. One server per session, a fresh database per
test; an outage test may stop it and start it again on the same port.

Without the binaries the tests that need it are skipped, unless LMGATE_REQUIRE_POSTGRES=1 (as
CI sets it), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, missing_tool

USER = "lmgate"


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, bin_dir: Path, directory: Path) -> None:
        self._bin = bin_dir
        self._dir = directory
        self.port = free_port()
        self.password = "pw-" + secrets.token_urlsafe(12)
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_postgres:
            shutil.chown(directory, "postgres")
        password_file = directory / "pwfile"
        password_file.write_text(self.password)
        if self._as_postgres:
            shutil.chown(password_file, "postgres")
        self._run(
            "initdb", "-D", str(directory / "data"), "-U", USER, f"--pwfile={password_file}",
            "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        password_file.unlink()
        self.running = False
        self._databases = 0

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as_postgres, str(self._bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{USER}:{secret}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self._dir / "data"), "-w", "-t", "30",
            "-l", str(self._dir / "log"), "-o", options, "start",
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", "fast", "-w", "stop")
            self.running = False

    def _processes(self) -> list[int]:
        """The postmaster and every process it started (the backends, the checkpointer...)."""
        postmaster = int((self._dir / "data" / "postmaster.pid").read_text().split()[0])
        found = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if int(fields[1]) == postmaster:
                found.append(int(stat.parent.name))
        return found

    def freeze(self) -> None:
        """Stop every process of the server without closing a connection: its kernel still
        acknowledges, so clients wait on it as on a hung or paused machine."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        import psycopg

        self._databases += 1
        name = f"test{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server_session() -> Iterator[PostgresServer]:
    bin_dir = _binaries()
    if bin_dir is None:
        missing_tool("PostgreSQL (initdb)", "LMGATE_REQUIRE_POSTGRES")
    with tempfile.TemporaryDirectory(prefix="lmgate-pg-") as directory:
        server = PostgresServer(bin_dir, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def postgres_server(postgres_server_session: PostgresServer) -> PostgresServer:
    if not postgres_server_session.running:
        postgres_server_session.start()  # a test before stopped it
    return postgres_server_session


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()
