"""``lmgate deploy nginx``: an nginx site and a systemd unit for a server (the seed's VPS option).

nginx terminates TLS (certbot's paths) and must not buffer the streams; LM Gate listens on
loopback behind it and believes nginx's X-Forwarded-For because nginx is its only trusted proxy.

With ``--replica`` given more than once the site spreads requests over several LM Gate replicas
(state.backend = postgres, README "Team gateway"): an ``upstream`` block, least connections
first (a stream holds its replica for minutes, so round robin would pile them up), and a
request passed to the next replica only when the first could not be reached — never a chat
that was already sent, which would run twice. Replicas on this machine get a systemd template
unit, one instance per port.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tray_app.cli.input_errors import InputError

# Matched whole (re.fullmatch): `$` alone would let a trailing newline through into the files.
_DOMAIN = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")


@dataclass(frozen=True, slots=True)
class Deployment:
    domain: str
    port: int = 8787
    user: str = "lmgate"
    upstream: str = "http://127.0.0.1:1234"
    certificate: str = ""
    certificate_key: str = ""
    https_port: int = 443
    http_port: int = 80
    lmgate_path: str = ""
    # host:port of each LM Gate replica; empty: one, on 127.0.0.1:port.
    replicas: tuple[str, ...] = ()

    def validate(self) -> Deployment:
        # ASCII first: lower() makes a Kelvin sign a "k" the site would not spell.
        if not self.domain.isascii() or not _DOMAIN.fullmatch(self.domain.lower()):
            raise InputError(
                "--domain", f"{self.domain!r} is not a domain name like llm.example.com"
            )
        for name, port in (
            ("--port", self.port),
            ("--https-port", self.https_port),
            ("--http-port", self.http_port),
        ):
            if not 1 <= port <= 65535:
                raise InputError(name, f"must be between 1 and 65535, got {port}")
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", self.user):
            raise InputError("--user", f"{self.user!r} is not a valid system user name")
        seen = set()
        for replica in self.replicas:
            address = _replica_address(replica)
            if address in seen:
                raise InputError("--replica", f"{replica!r} is given twice")
            seen.add(address)
        return self

    @property
    def servers(self) -> tuple[str, ...]:
        """host:port of every replica nginx passes requests to."""
        if not self.replicas:
            return (f"127.0.0.1:{self.port}",)
        return tuple(_replica_address(r) for r in self.replicas)

    @property
    def several(self) -> bool:
        """Whether this is a team gateway: replicas sharing state behind one site."""
        return len(self.replicas) > 1

    @property
    def local_ports(self) -> tuple[int, ...]:
        """The ports of the replicas this machine runs (those on loopback)."""
        return tuple(int(s.rsplit(":", 1)[1]) for s in self.servers if _on_this_machine(s))

    @property
    def cert(self) -> str:
        return self.certificate or f"/etc/letsencrypt/live/{self.domain}/fullchain.pem"

    @property
    def key(self) -> str:
        return self.certificate_key or f"/etc/letsencrypt/live/{self.domain}/privkey.pem"

    @property
    def executable(self) -> str:
        return (
            self.lmgate_path
            or shutil.which("lmgate")
            or str(Path(sys.executable).with_name("lmgate"))
        )


_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")


def _replica_address(text: str) -> str:
    """``host:port`` checked and normalised; anything nginx would read as more than one
    address (spaces, semicolons, braces) is refused, since it lands in the site file."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(
            "--replica", f"{text!r} is not host:port, e.g. 127.0.0.1:8788 or 10.0.0.2:8787"
        )
    return f"{host.lower()}:{int(port)}"


def _on_this_machine(server: str) -> bool:
    return server.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]", "localhost")


def _upstream_block(d: Deployment) -> str:
    if not d.several:
        return ""
    servers = "".join(f"    server {s} max_fails=2 fail_timeout=10s;\n" for s in d.servers)
    return f"""# The LM Gate replicas; they share their state in PostgreSQL and Redis.
upstream lmgate_replicas {{
    least_conn;
{servers}    keepalive 64;
}}

"""


def _proxy_target(d: Deployment) -> str:
    return "http://lmgate_replicas" if d.several else f"http://{d.servers[0]}"


def _next_replica(d: Deployment) -> str:
    if not d.several:
        return ""
    return """        # Only a replica that could not be reached is skipped: nginx never passes
        # a POST it has already sent to another one, so a chat cannot run twice.
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 2;
        proxy_connect_timeout 3s;
"""


def nginx_site(d: Deployment) -> str:
    return f"""# LM Gate behind nginx for {d.domain} — written by `lmgate deploy nginx`.
{_upstream_block(d)}server {{
    listen {d.http_port};
    listen [::]:{d.http_port};
    server_name {d.domain};
    # certbot's HTTP challenge; everything else goes to HTTPS.
    location /.well-known/acme-challenge/ {{ root /var/www/html; }}
    location / {{ return 301 https://$host$request_uri; }}
}}

server {{
    listen {d.https_port} ssl;
    listen [::]:{d.https_port} ssl;
    server_name {d.domain};

    ssl_certificate {d.cert};
    ssl_certificate_key {d.key};
    ssl_protocols TLSv1.2 TLSv1.3;

    # Image inputs arrive inside JSON bodies.
    client_max_body_size 32m;

    location / {{
        proxy_pass {_proxy_target(d)};
{_next_replica(d)}        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        # The client's address as nginx saw it; LM Gate trusts this header only from here.
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;

        # Streams (SSE) must pass chunk by chunk, and long generations must not time out.
        proxy_buffering off;
        proxy_cache off;
        proxy_request_buffering off;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
    }}
}}
"""


def systemd_unit(d: Deployment) -> str:
    several = d.several
    # One template, one instance per port (lmgate@8787, lmgate@8788): the replicas differ in
    # nothing else; their state is shared, so they need the backend named.
    port = "%i" if several else str(d.port)
    shared = "Environment=LMGATE_STATE_BACKEND=postgres\n" if several else ""
    return f"""# LM Gate as a service — written by `lmgate deploy nginx`.
[Unit]
Description=LM Gate (authenticating gateway for LM Studio){" on port %i" if several else ""}
After=network-online.target
Wants=network-online.target

[Service]
User={d.user}
Group={d.user}
ExecStart={d.executable} serve --host 127.0.0.1 --port {port} --secret-store file
{shared}Environment=LMGATE_STORAGE_DATA_DIR=/var/lib/lmgate
Environment=LMGATE_SERVER_TRUSTED_PROXIES=127.0.0.1/32,::1/128
Environment=LMGATE_SERVER_ALLOWED_HOSTS={d.domain}
Environment=LMGATE_UPSTREAM_URL={d.upstream}
StateDirectory=lmgate
StateDirectoryMode=0700
Restart=on-failure
RestartSec=3
# Nothing but its own state directory is writable; no new privileges.
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
ReadWritePaths=/var/lib/lmgate

[Install]
WantedBy=multi-user.target
"""


def instructions(d: Deployment, site: Path, unit: Path) -> str:
    if d.several:
        return _replica_instructions(d, site, unit)
    return f"""Wrote {site} and {unit}. To enable them:

  sudo useradd --system --home /var/lib/lmgate --shell /usr/sbin/nologin {d.user}
  sudo cp {unit} /etc/systemd/system/lmgate.service
  sudo cp {site} /etc/nginx/sites-available/lmgate
  sudo ln -s /etc/nginx/sites-available/lmgate /etc/nginx/sites-enabled/lmgate
  sudo certbot certonly --webroot -w /var/www/html -d {d.domain}
  sudo nginx -t && sudo systemctl reload nginx
  sudo systemctl daemon-reload && sudo systemctl enable --now lmgate
  sudo -u {d.user} LMGATE_STORAGE_DATA_DIR=/var/lib/lmgate {d.executable} key create my-laptop \\
      --secret-store file

Then check it from anywhere: lmgate check https://{d.domain} <the key>
"""


def _replica_instructions(d: Deployment, site: Path, unit: Path) -> str:
    as_user = (
        f"sudo -u {d.user} LMGATE_STORAGE_DATA_DIR=/var/lib/lmgate LMGATE_STATE_BACKEND=postgres "
        f"{d.executable}"
    )
    instances = " ".join(f"lmgate@{p}" for p in d.local_ports)
    remote = [s for s in d.servers if not _on_this_machine(s)]
    start = f"  sudo systemctl daemon-reload && sudo systemctl enable --now {instances}\n"
    elsewhere = (
        "\nOn each other machine ("
        + ", ".join(remote)
        + "): the same secrets, and `lmgate serve --host <its private address> --port <port>`\n"
        "with LMGATE_STATE_BACKEND=postgres and LMGATE_SERVER_TRUSTED_PROXIES=<this machine's\n"
        "private address>; keep that network private (the replicas speak plain HTTP to nginx).\n"
        if remote
        else ""
    )
    return f"""Wrote {site} and {unit} ({len(d.servers)} replicas sharing PostgreSQL and Redis).
To enable them:

  sudo useradd --system --home /var/lib/lmgate --shell /usr/sbin/nologin {d.user}
  {as_user} secret set state-database-url --secret-store file
  {as_user} secret set state-redis-url --secret-store file
  {as_user} secret set jwt-signing-key --secret-store file   # the same on every machine
  sudo cp {unit} /etc/systemd/system/lmgate@.service
  sudo cp {site} /etc/nginx/sites-available/lmgate
  sudo ln -s /etc/nginx/sites-available/lmgate /etc/nginx/sites-enabled/lmgate
  sudo certbot certonly --webroot -w /var/www/html -d {d.domain}
  sudo nginx -t && sudo systemctl reload nginx
{start if instances else ""}  {as_user} key create my-laptop --secret-store file
{elsewhere}
Then check it from anywhere: lmgate check https://{d.domain} <the key>
"""


def write(d: Deployment, directory: Path) -> tuple[Path, Path]:
    d.validate()
    directory.mkdir(parents=True, exist_ok=True)
    site = directory / "lmgate-nginx.conf"
    unit = directory / ("lmgate@.service" if d.several else "lmgate.service")
    site.write_text(nginx_site(d), encoding="utf-8")
    unit.write_text(systemd_unit(d), encoding="utf-8")
    return site, unit
