"""A private Docker engine for the shipping tests, inside a network namespace of its own.

Debian's `dockerd` runs as root with its state under a temporary directory and inside a
network namespace the tests create: its bridge, its iptables chains and its ip_forward switch
all live and die with that namespace, so the host's firewall is never touched, and the
compose file can publish its real port 8787 even where an LM Gate already runs on it. No
image registry is reachable, so the base image is made from a Debian filesystem that
tests/docker_prepare.sh built with debootstrap; a stand-in tagged ``python:3.11-slim`` lets the
project's Dockerfile build unchanged. Its pip is configured, as a company's base image would
be, to install only from a wheel server on the bridge's address in the namespace (the wheels
were downloaded in the same install step), so nothing is downloaded while the tests run and the
README's commands build the image verbatim.

Code that must reach the namespace's addresses runs on :class:`NamespaceLoop`, a thread that
entered the namespace (a thread's network namespace is its own) with an asyncio loop on it.

The team Compose test (tests/shipping/test_team_compose.py) needs the official
``postgres:15-bookworm``, ``redis:7-bookworm`` and ``nginx:stable-bookworm`` images, which no
registry here can give. :func:`build_service_standins` builds STAND-INS tagged exactly so, from
Debian bookworm's own postgresql, redis-server and nginx-light packages (a second filesystem
tests/docker_prepare.sh made). They are not the official images: each honours only the part of
its interface that ``lmgate deploy compose``'s file relies on (the environment variables, the
paths, the user, the commands), which is what the test checks the file against.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import http.server
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers import REPO_ROOT

CACHE = REPO_ROOT / ".cache" / "docker"
ROOTFS = CACHE / "bookworm-python.tar"
SERVICES_ROOTFS = CACHE / "bookworm-services.tar"  # postgresql, redis-server, nginx-light
SERVICES_TAG = "local/debian-services:bookworm"
WHEELS = CACHE / "wheels"
BASE_TAG = "local/debian-python:bookworm"
PYTHON_TAG = "python:3.11-slim"  # what the Dockerfile builds FROM
CLONE_NEWNET = 0x40000000
PREFIX = "lmgate-docker-"  # + the test process's PID: namespaces and state directories
BRIDGE_IP = "172.31.250.1"  # the engine's bridge, on the namespace's side: fixed by --bip
T = TypeVar("T")

# Debian's python3 in a virtualenv at /usr/local, where python:3.11-slim keeps its Python;
# its pip reads only the test's wheel server.
_PYTHON_STANDIN = f"""FROM {BASE_TAG}
COPY pip.conf /etc/pip.conf
RUN python3 -m venv /usr/local
ENV PATH=/usr/local/bin:$PATH LANG=C.UTF-8
CMD ["python3"]
"""

# `docker compose` (v2 syntax) for the engine's compose v1: a CLI plugin that hands over.
_COMPOSE_SHIM = """#!/bin/sh
if [ "$1" = docker-cli-plugin-metadata ]; then
  echo '{"SchemaVersion":"0.1.0","Vendor":"LM Gate tests","Version":"1.29",' \
       '"ShortDescription":"docker-compose v1"}'
  exit 0
fi
shift
# v2 allocates a terminal for exec only when there is one; v1 always tries to. A -T given
# already is not given twice (v1 refuses that).
if ! [ -t 0 ]; then
  after_exec=
  for arg; do
    shift
    if [ "$arg" = exec ]; then set -- "$@" exec -T; after_exec=1; continue; fi
    if [ -n "$after_exec" ] && [ "$arg" = -T ]; then after_exec=; continue; fi
    after_exec=
    set -- "$@" "$arg"
  done
fi
exec docker-compose "$@"
"""


# postgres:15-bookworm: the official entrypoint's contract, for what compose.yaml uses. Started
# as root: POSTGRES_PASSWORD_FILE read (as root, so a 0600 file of the host user's will do),
# then the rest as postgres. On an empty PGDATA: initdb with POSTGRES_USER as the superuser
# and the password as its password, scram-sha-256 for every host connection, POSTGRES_DB
# created on a server that listens on no address while it does; then the server on all
# addresses.
_POSTGRES_STANDIN = f"""FROM {SERVICES_TAG}
RUN groupmod -g 999 postgres && usermod -u 999 -g 999 postgres \\
    && mkdir -p /var/lib/postgresql/data /run/postgresql \\
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql \\
    && chmod 0700 /var/lib/postgresql/data && chmod 2777 /run/postgresql
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
"""
_POSTGRES_ENTRYPOINT = """#!/bin/sh
set -eu
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
    export POSTGRES_PASSWORD
    unset POSTGRES_PASSWORD_FILE
  fi
  chown postgres:postgres "$PGDATA" && chmod 0700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --clear-groups "$0" "$@"
fi
if [ "$1" = postgres ]; then
  shift
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?the official image refuses to start without POSTGRES_PASSWORD}"
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    pwfile=$(mktemp)
    printf '%s\\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \\
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
      pg_ctl -D "$PGDATA" -w -s -o "-c listen_addresses=''" start
      # From stdin: psql substitutes :"db" (quoted as a name) there, not in -c.
      echo 'CREATE DATABASE :"db";' | psql -q -v ON_ERROR_STOP=1 -U "$user" -d postgres -v db="$db"
      pg_ctl -D "$PGDATA" -w -s -m fast stop
    fi
  fi
  exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
"""

# redis:7-bookworm: `redis-server [config file]` as uid 999 in /data.
_REDIS_STANDIN = f"""FROM {SERVICES_TAG}
RUN groupmod -g 999 redis && usermod -u 999 -g 999 redis \\
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
VOLUME /data
EXPOSE 6379
CMD ["redis-server"]
"""

# nginx:stable-bookworm: the official image's nginx.conf (conf.d/*.conf inside http, logs to
# stdout and stderr) and its default site (conf.d/default.conf, which compose.yaml's site file
# replaces), Debian's own default site gone, `nginx -g 'daemon off;'` as root (the master).
_NGINX_STANDIN = f"""FROM {SERVICES_TAG}
COPY nginx.conf /etc/nginx/nginx.conf
RUN rm -rf /etc/nginx/sites-enabled /etc/nginx/conf.d/* \\
    && mkdir -p /var/log/nginx \\
    && ln -sf /dev/stdout /var/log/nginx/access.log \\
    && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80 443
COPY default.conf /etc/nginx/conf.d/default.conf
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
"""
_NGINX_DEFAULT_SITE = """server {
    listen 80;
    server_name localhost;
    location / { return 200 "the image's default site\\n"; }
}
"""
_NGINX_CONF = """user www-data;
worker_processes auto;
error_log /var/log/nginx/error.log notice;
pid /run/nginx.pid;
events {
    worker_connections 1024;
}
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format main '$remote_addr - $remote_user [$time_local] "$request" '
                    '$status $body_bytes_sent "$http_referer" '
                    '"$http_user_agent" "$http_x_forwarded_for"';
    access_log /var/log/nginx/access.log main;
    sendfile on;
    keepalive_timeout 65;
    include /etc/nginx/conf.d/*.conf;
}
"""
STANDINS = {
    "postgres:15-bookworm": (_POSTGRES_STANDIN, {"entrypoint.sh": _POSTGRES_ENTRYPOINT}),
    "redis:7-bookworm": (_REDIS_STANDIN, {}),
    "nginx:stable-bookworm": (
        _NGINX_STANDIN,
        {"nginx.conf": _NGINX_CONF, "default.conf": _NGINX_DEFAULT_SITE},
    ),
}


def missing_tools() -> list[str]:
    needed = ["dockerd", "docker", "docker-compose", "ip", "nsenter", "iptables-save"]
    return [tool for tool in needed if shutil.which(tool) is None]


def prepared() -> bool:
    return ROOTFS.is_file() and (WHEELS / ".complete").is_file()


def services_prepared() -> bool:
    return SERVICES_ROOTFS.is_file()


def build_service_standins(engine: Engine) -> None:
    """Import the services filesystem and build the three stand-ins (see the docstring)."""
    with SERVICES_ROOTFS.open("rb") as rootfs:
        imported = subprocess.run(
            ["docker", "import", "-", SERVICES_TAG],
            stdin=rootfs,
            env=engine.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
    assert imported.returncode == 0, imported.stderr
    for tag, (dockerfile, files) in STANDINS.items():
        context = engine.home / ("standin-" + tag.split(":")[0])
        context.mkdir()
        (context / "Dockerfile").write_text(dockerfile)
        for name, text in files.items():
            (context / name).write_text(text)
            (context / name).chmod(0o755)
        engine.docker("build", "-q", "-t", tag, str(context), timeout=300)


class NamespaceLoop:
    """An asyncio loop on a thread inside a network namespace: sockets it opens, listening or
    connecting, are the namespace's; subprocesses it starts inherit the namespace."""

    def __init__(self, netns: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._entered: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(netns,), daemon=True)
        self._thread.start()
        self._entered.result(10)

    def _main(self, netns: str) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
        except BaseException as exc:
            self._entered.set_exception(exc)
            return
        self._entered.set_result(None)
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Engine:
    netns: str
    home: Path
    env: dict[str, str]
    loop: NamespaceLoop
    wheel_url: str = ""
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {result.stdout}{result.stderr}")
        return result

    def in_netns(self, *argv: str) -> list[str]:
        """A command line that runs ``argv`` inside the engine's network namespace."""
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv]


def _run(*argv: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stdout}{done.stderr}")
    return done.stdout


def _answers(engine: Engine, dockerd: subprocess.Popen[bytes]) -> bool:
    if dockerd.poll() is not None:
        raise AssertionError(f"dockerd exited ({dockerd.returncode})")
    return engine.docker("version", check=False, timeout=10).returncode == 0


def _wait_for(what: str, ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


async def _serve_wheels() -> tuple[str, Any]:
    """A plain HTTP server of the wheels directory, in the namespace, where the build's
    containers reach it on the bridge: pip reads its directory listing as a find-links page."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per wheel on the test's stderr says nothing

    handler = functools.partial(Handler, directory=str(WHEELS))

    class Quiet(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    server = Quiet(("0.0.0.0", 0), handler)  # inside the test's own namespace
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://{BRIDGE_IP}:{server.server_address[1]}/", server


@contextlib.contextmanager
def running_engine() -> Iterator[Engine]:
    """Start the namespace, the engine and the base images; afterwards remove them all."""
    _sweep_stale()
    name = f"{PREFIX}{os.getpid()}"
    home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    host_firewall = _firewall()
    _run("ip", "netns", "add", name)
    dockerd: subprocess.Popen[bytes] | None = None
    loop: NamespaceLoop | None = None
    wheel_server: Any = None
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        plugins = home / "config" / "cli-plugins"
        plugins.mkdir(parents=True)
        shim = plugins / "docker-compose"
        shim.write_text(_COMPOSE_SHIM)
        shim.chmod(0o755)
        socket_path = home / "docker.sock"
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(home),
            "DOCKER_HOST": f"unix://{socket_path}",
            "DOCKER_CONFIG": str(home / "config"),
            "DOCKER_BUILDKIT": "0",  # no buildx here: the classic builder, quietly
        }
        with (home / "dockerd.log").open("wb") as log:
            dockerd = subprocess.Popen(
                [
                    # nsenter, not `ip netns exec`: that also remounts /sys, hiding the
                    # cgroup mounts dockerd needs.
                    "nsenter", f"--net=/var/run/netns/{name}",
                    "dockerd",
                    "-H", f"unix://{socket_path}",
                    "--data-root", str(home / "root"),
                    "--exec-root", str(home / "exec"),
                    "--pidfile", str(home / "dockerd.pid"),
                    "--bip", f"{BRIDGE_IP}/24",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        engine = Engine(name, home, env, NamespaceLoop(name))
        loop = engine.loop
        try:
            _wait_for(
                "dockerd answering",
                lambda: _answers(engine, dockerd),
                60,
            )
        except AssertionError as exc:
            log_tail = (home / "dockerd.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{exc}; dockerd said:\n{log_tail}") from None
        engine.wheel_url, wheel_server = loop.run(_serve_wheels())
        with ROOTFS.open("rb") as rootfs:
            imported = subprocess.run(
                ["docker", "import", "-", BASE_TAG],
                stdin=rootfs,
                env=env,
                capture_output=True,
                timeout=300,
                check=False,
            )
        assert imported.returncode == 0, imported.stderr
        standin = home / "python-standin"
        standin.mkdir()
        (standin / "Dockerfile").write_text(_PYTHON_STANDIN)
        (standin / "pip.conf").write_text(
            f"[global]\nno-index = true\nfind-links = {engine.wheel_url}\n"
            f"trusted-host = {BRIDGE_IP}\ndisable-pip-version-check = true\n"
        )
        engine.docker("build", "-q", "-t", PYTHON_TAG, str(standin), timeout=300)
        yield engine
    finally:
        if wheel_server is not None:
            wheel_server.shutdown()
            wheel_server.server_close()
        if dockerd is not None:
            _stop_dockerd(dockerd, home)
        if loop is not None:
            loop.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        _remove_tree(home)
        # The namespace held every rule dockerd made: the host's must be exactly as before.
        assert _firewall() == host_firewall, "the host's firewall or forwarding changed"


def _firewall() -> list[str]:
    """The host's iptables rules and IPv4 forwarding switch, without counters and dates."""
    rules = _run("iptables-save").splitlines()
    kept = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in rules if not line.startswith("#")]
    return [*kept, "ip_forward=" + Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()]


def _sweep_stale() -> None:
    """What a killed run left (its finally never ran): namespaces and engines of test
    processes that are gone. Those of a run still going are left alone."""

    def gone(pid: str) -> bool:
        return pid.isdigit() and not Path(f"/proc/{pid}").exists()

    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in listed.stdout.splitlines():
        netns = line.split()[0] if line.split() else ""
        if netns.startswith(PREFIX) and gone(netns.removeprefix(PREFIX)):
            pids = subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
            )
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
    for home in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        if gone(home.name.removeprefix(PREFIX).split("-")[0]):
            pid_file = home / "dockerd.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            _remove_tree(home)


def _stop_dockerd(dockerd: subprocess.Popen[bytes], home: Path) -> None:
    with contextlib.suppress(Exception):
        subprocess.run(
            ["sh", "-c", "docker ps -aq | xargs -r docker rm -f"],
            env={"DOCKER_HOST": f"unix://{home / 'docker.sock'}", "PATH": os.environ["PATH"]},
            capture_output=True,
            timeout=60,
            check=False,
        )
    pid_file = home / "dockerd.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # dockerd itself, not `ip netns exec`
    try:
        dockerd.wait(30)
    except subprocess.TimeoutExpired:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        dockerd.wait(10)


def _remove_tree(home: Path) -> None:
    """The engine's state, once nothing is mounted below it any more."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    below = [line.split()[1] for line in mounts if line.split()[1].startswith(str(home))]
    for mount in sorted(below, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    shutil.rmtree(home, ignore_errors=True)
