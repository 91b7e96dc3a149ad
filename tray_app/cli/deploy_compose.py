"""``lmgate deploy compose``: the team gateway (README "Team gateway") as one Compose project.

nginx terminates TLS in front of N replicas that share PostgreSQL and Redis. The site is the
one ``lmgate deploy nginx --replica lmgate-1:8787 ...`` writes (its code, not a copy), with the
certificate paths inside the nginx container. Two networks keep the state private: ``edge``
(nginx and the replicas; nginx has a fixed address there, the only proxy the replicas trust)
and ``state``, internal (no route out), where only the replicas reach PostgreSQL and Redis.

The secrets are made here, once: the PostgreSQL volume is initialised with the first password,
so a rerun keeps every secret file and rewrites only compose.yaml and the nginx site. No secret
is printed or written into compose.yaml; they reach the containers through env files and a
mounted Redis config (never a command line, which ``ps`` shows to every local user).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from tray_app.cli.deploy import Deployment, nginx_site
from tray_app.cli.input_errors import InputError
from tray_app.config.parsers import upstream_url
from tray_app.config.settings import Config

MAX_REPLICAS = 8
PORT = 8787  # the image's own
TLS_DIR = "/etc/nginx/tls"  # where nginx's container sees DIR/tls
# The edge network is fixed so nginx's address is known before anything starts: the replicas
# trust X-Forwarded-For from that one address. It lies outside Docker's default address pools
# (172.17-31.x, 192.168.x), so it meets no network Docker makes by itself; a small /27 and
# dynamic addresses only in its lower half, so that no replica (created before nginx, which
# depends on them) can take nginx's address.
EDGE_SUBNET = "10.87.87.0/27"
EDGE_DYNAMIC = "10.87.87.0/28"
NGINX_ADDRESS = "10.87.87.30"
SECRET_FILES = ("lmgate.env", "postgres.env", "redis.conf")
PEMS = ("privkey.pem", "fullchain.pem")  # certbot's names
# An image reference ([registry[:port]/]name[:tag][@digest]): nothing else can reach the YAML.
_IMAGE = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]{1,5})?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


@dataclass(frozen=True, slots=True)
class ComposeDeployment:
    domain: str
    replicas: int = 2
    upstream_url: str = "http://host.docker.internal:1234"
    image: str = "lmgate"

    def validate(self) -> ComposeDeployment:
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise InputError(
                "--replicas", f"must be between 1 and {MAX_REPLICAS}, got {self.replicas}"
            )
        try:
            upstream_url(self.upstream_url)
        except ValueError as exc:
            raise InputError("--upstream-url", str(exc)) from None
        if not _IMAGE.match(self.image):
            raise InputError(
                "--image", f"{self.image!r} is not an image name like lmgate or lmgate:1.4"
            )
        self.site.validate()  # the domain, checked as `deploy nginx` checks it
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"lmgate-{n}" for n in range(1, self.replicas + 1))

    @property
    def site(self) -> Deployment:
        """What `deploy nginx` would be given for these replicas, inside the nginx container."""
        return Deployment(
            domain=self.domain,
            replicas=tuple(f"{name}:{PORT}" for name in self.names),
            certificate=f"{TLS_DIR}/fullchain.pem",
            certificate_key=f"{TLS_DIR}/privkey.pem",
        )


def _quoted(text: str) -> str:
    # A JSON string is a YAML double-quoted scalar: nothing in a value can become structure.
    return json.dumps(text)


def compose_file(d: ComposeDeployment) -> str:
    # stop: a running answer may finish (server.shutdown_grace) before Compose kills.
    grace = int(Config().server_shutdown_grace) + 5
    replicas = "".join(f"  {name}:\n    <<: *lmgate\n" for name in d.names)
    depends = "".join(f"      - {name}\n" for name in d.names)
    return f"""# The LM Gate team gateway for {d.domain} — written by `lmgate deploy compose`.
# Secrets are in secrets/ (never here); certificates go in tls/. Rewritten on every run.
# The project is named after this directory (Compose's default): its volume is <dir>_postgres-data.

x-lmgate: &lmgate
  image: {_quoted(d.image)}
  environment:
    LMGATE_STATE_BACKEND: postgres
    LMGATE_SECRETS_STORE: env
    LMGATE_UPSTREAM_URL: {_quoted(d.upstream_url)}
    LMGATE_SERVER_ALLOWED_HOSTS: {_quoted(d.domain)}
    # Only nginx's X-Forwarded-For is believed; it has this fixed address on `edge`.
    LMGATE_SERVER_TRUSTED_PROXIES: "{NGINX_ADDRESS}/32"
  env_file: secrets/lmgate.env
  extra_hosts:
    - "host.docker.internal:host-gateway"   # LM Studio on the host
  networks: [edge, state]
  depends_on:
    postgres:
      condition: service_healthy
    redis:
      condition: service_healthy
  read_only: true
  tmpfs: [/tmp]
  cap_drop: [ALL]
  security_opt: ["no-new-privileges:true"]
  restart: unless-stopped
  # Longer than server.shutdown_grace: a stop lets running answers finish.
  stop_grace_period: {grace}s

services:
  nginx:
    image: nginx:stable-bookworm
    ports:
      - "80:80"
      - "443:443"
    volumes:
      - ./nginx:/etc/nginx/conf.d:ro
      - ./tls:{TLS_DIR}:ro
    networks:
      edge:
        ipv4_address: {NGINX_ADDRESS}
    # nginx resolves the replicas' names when it starts.
    depends_on:
{depends}    restart: unless-stopped

{replicas}
  postgres:
    image: postgres:15-bookworm
    environment:
      POSTGRES_USER: lmgate
      POSTGRES_DB: lmgate
    env_file: secrets/postgres.env
    volumes:
      - postgres-data:/var/lib/postgresql/data
    networks: [state]
    healthcheck:
      # Over TCP: while the image initialises the database, its server listens only on a
      # socket, and a socket check would call that temporary server ready.
      test: ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", "lmgate", "-d", "lmgate"]
      interval: 2s
      timeout: 5s
      retries: 30
    restart: unless-stopped

  redis:
    image: redis:7-bookworm
    # The password is in the mounted file: in argv every local user could read it.
    command: ["redis-server", "/usr/local/etc/redis/redis.conf"]
    volumes:
      - ./secrets/redis.conf:/usr/local/etc/redis/redis.conf:ro
    networks: [state]
    healthcheck:
      # Up is enough here (an answer, even "authentication required"): a password on the
      # check's command line would be visible.
      test: ["CMD-SHELL", "redis-cli ping 2>&1 | grep -qE '^(PONG|NOAUTH)'"]
      interval: 2s
      timeout: 5s
      retries: 30
    restart: unless-stopped

networks:
  edge:
    ipam:
      config:
        - subnet: {EDGE_SUBNET}
          ip_range: {EDGE_DYNAMIC}
  state:
    internal: true   # no way out: PostgreSQL and Redis talk to the replicas only

volumes:
  postgres-data: {{}}
"""


def _secret_texts() -> dict[str, str]:
    database, cache, signing = (secrets.token_urlsafe(32) for _ in range(3))
    return {
        "lmgate.env": (
            "# LM Gate's shared secrets, the same for every replica (`lmgate deploy compose`).\n"
            f"LMGATE_SECRET_STATE_DATABASE_URL=postgresql://lmgate:{database}@postgres:5432/lmgate\n"
            f"LMGATE_SECRET_STATE_REDIS_URL=redis://:{cache}@redis:6379/0\n"
            f"LMGATE_SECRET_JWT_SIGNING_KEY={signing}\n"
        ),
        "postgres.env": (
            "# The PostgreSQL volume was initialised with this password: keep it.\n"
            f"POSTGRES_PASSWORD={database}\n"
        ),
        "redis.conf": (
            f"# Mounted into the redis container (`lmgate deploy compose`).\nrequirepass {cache}\n"
        ),
    }


def _file_modes() -> dict[str, int]:
    # redis.conf is bind-mounted and read by Redis as its own user (uid 999), not by the
    # user who runs Compose, so it must be readable by others; the 0700 directory around it
    # keeps every other local user out, while the container sees the file itself.
    return {"lmgate.env": 0o600, "postgres.env": 0o600, "redis.conf": 0o644}


def _check_output(directory: Path) -> bool:
    """Whether the secrets exist already. Refuses what a write would half do."""
    if directory.exists() and not directory.is_dir():
        raise InputError("--output", f"{directory} is a file, not a directory")
    for sub in ("nginx", "secrets", "tls"):
        if (directory / sub).exists() and not (directory / sub).is_dir():
            raise InputError("--output", f"{directory / sub} is a file, not a directory")
    present = [name for name in SECRET_FILES if (directory / "secrets" / name).exists()]
    if present and len(present) != len(SECRET_FILES):
        missing = sorted(set(SECRET_FILES) - set(present))
        raise InputError(
            "--output",
            f"{directory / 'secrets'} holds {', '.join(present)} but not {', '.join(missing)}: "
            "restore them, or delete secrets/ and the project's volumes (docker compose down -v)",
        )
    return bool(present)


def write(d: ComposeDeployment, directory: Path) -> tuple[list[Path], bool]:
    """Write the project: the files written, and whether the secrets were there already (and
    kept). Every check runs before the first file is written."""
    d.validate()
    kept = _check_output(directory)
    site = nginx_site(d.site)  # byte for byte what `deploy nginx` writes for these
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for sub in ("secrets", "tls"):
            (directory / sub).mkdir(mode=0o700, exist_ok=True)
        (directory / "secrets").chmod(0o700)
        (directory / "nginx").mkdir(exist_ok=True)
        written = [directory / "compose.yaml", directory / "nginx" / "lmgate.conf"]
        written[0].write_text(compose_file(d), encoding="utf-8")
        written[1].write_text(site, encoding="utf-8")
        if not kept:
            modes = _file_modes()
            for name, text in _secret_texts().items():
                path = directory / "secrets" / name
                # Created with its mode: never readable by others, even for a moment.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    file.write(text)
                path.chmod(modes[name])
                written.append(path)
    except OSError as exc:
        raise InputError(
            "--output", f"cannot write {exc.filename or directory}: {exc.strerror}"
        ) from None
    return written, kept


def instructions(d: ComposeDeployment, directory: Path, secrets_kept: bool) -> str:
    # Quoted: the commands are to be pasted into a shell, whatever the directory is called.
    compose = f"docker compose -f {shlex.quote(str(directory / 'compose.yaml'))}"
    tls = directory / "tls"
    key, chain = (shlex.quote(str(tls / name)) for name in PEMS)
    kept = (
        "Kept the secrets already in secrets/ (the PostgreSQL volume knows that password).\n"
        if secrets_kept
        else "Made fresh secrets in secrets/ (keep them: the database is initialised with them).\n"
    )
    return f"""Wrote {directory / "compose.yaml"} and {directory / "nginx" / "lmgate.conf"} \
({d.replicas} {"replica" if d.replicas == 1 else "replicas"} sharing PostgreSQL and Redis).
{kept}
Put the certificate for {d.domain} in {tls}: fullchain.pem and privkey.pem (certbot's, copied
from /etc/letsencrypt/live/{d.domain}/). For a trial, a self-signed pair:

  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN={d.domain} \\
      -addext subjectAltName=DNS:{d.domain} -keyout {key} -out {chain}

Then, from LM Gate's repository:

  docker build -f packaging/Dockerfile -t {d.image} .
  {compose} up -d
  {compose} exec lmgate-1 lmgate key create my-laptop

Then check it from anywhere: lmgate check https://{d.domain} <the key>
"""
