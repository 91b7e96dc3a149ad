"""A team gateway for tests: several real `lmgate serve` processes sharing a real PostgreSQL
and a real Redis, with a real nginx in front built from `lmgate deploy nginx --replica`.

Each replica is its own process with its own data directory and the same three secrets
(database URL, Redis URL, signing master) passed as LMGATE_SECRET_* variables, as a container
would get them; nothing else is shared but what the backends share. The CLI runs against the
same database the way an operator's would.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import LMGATE, free_port, start_serve
from tests.nginx_server import Nginx, nginx_binary, self_signed, start_nginx

DOMAIN = "llm.example.test"


@dataclass
class Replica:
    process: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class TeamGateway:
    """Replicas started by :meth:`start`, stopped by :meth:`close` (each stop waited for)."""

    home: Path
    database_url: str
    redis_url: str
    upstream_url: str
    settings: Mapping[str, str] = field(default_factory=dict)
    master: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    replicas: list[Replica] = field(default_factory=list)
    nginx: Nginx | None = None
    nginx_url: str = ""  # https://127.0.0.1:PORT (self-signed; send Host: DOMAIN)

    def env(self, index: int | str = "cli", **extra: str) -> dict[str, str]:
        variables = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
        variables.update(
            {
                "LMGATE_CONFIG": str(self.home / "none.toml"),
                "LMGATE_STORAGE_DATA_DIR": str(self.home / f"data-{index}"),
                "LMGATE_STATE_BACKEND": "postgres",
                "LMGATE_SECRETS_STORE": "env",
                "LMGATE_SECRET_STATE_DATABASE_URL": self.database_url,
                "LMGATE_SECRET_STATE_REDIS_URL": self.redis_url,
                "LMGATE_SECRET_JWT_SIGNING_KEY": self.master,
                "LMGATE_UPSTREAM_URL": self.upstream_url,
                # nginx on loopback is the replicas' one trusted proxy, as deploy configures.
                "LMGATE_SERVER_TRUSTED_PROXIES": "127.0.0.1/32",
                "LMGATE_SERVER_ALLOWED_HOSTS": DOMAIN,
                "LMGATE_LOG_LEVEL": "warning",
                **self.settings,
                **extra,
            }
        )
        return variables

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LMGATE, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(),
            input=stdin,
        )

    def start(self, count: int) -> TeamGateway:
        for _ in range(count):
            self.add_replica()
        return self

    def add_replica(self, **extra: str) -> Replica:
        index = len(self.replicas)
        process, url = start_serve(self.env(index, **extra), stderr=subprocess.DEVNULL)
        replica = Replica(process, url)
        self.replicas.append(replica)
        return replica

    def restart(self, index: int, stderr: Any, **extra: str) -> Replica:
        """Replica ``index`` started again on its own data directory (after a kill)."""
        old = self.replicas[index].process
        assert old.poll() is not None
        for stream in (old.stdout, old.stderr):
            if stream is not None:
                stream.close()
        process, url = start_serve(self.env(index, **extra), stderr=stderr)
        self.replicas[index] = Replica(process, url)
        return self.replicas[index]

    def create_key(self, name: str = "team", *args: str) -> str:
        made = self.cli("key", "create", name, *args)
        assert made.returncode == 0, made.stderr
        match = re.search(r"\blmg_[A-Za-z0-9_-]+", made.stdout)
        assert match, made.stdout
        return match.group(0)

    def start_nginx(self) -> Nginx:
        nginx_binary()  # skipped (or failed, in CI) before anything is written
        cert, key = self_signed(self.home, DOMAIN)
        https, http = free_port(), free_port()
        out = self.home / "deploy"
        replicas = [arg for r in self.replicas for arg in ("--replica", f"127.0.0.1:{r.port}")]
        made = self.cli(
            "deploy", "nginx", "--domain", DOMAIN, "--output", str(out),
            "--certificate", str(cert), "--certificate-key", str(key),
            "--https-port", str(https), "--http-port", str(http), *replicas,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        self.nginx = start_nginx(self.home / "nginx", out / "lmgate-nginx.conf", https)
        self.nginx_url = f"https://127.0.0.1:{https}"
        return self.nginx

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        process = self.replicas[index].process
        process.send_signal(sig)
        process.wait(30)

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for replica in self.replicas:
            if replica.alive:
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            try:
                replica.process.wait(20)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()
            for stream in (replica.process.stdout, replica.process.stderr):
                if stream is not None:
                    stream.close()
