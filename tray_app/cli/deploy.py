"""``lmgate deploy nginx``: an nginx site and a systemd unit for a server (the seed's VPS option).

nginx terminates TLS (certbot's paths) and must not buffer the streams; LM Gate listens on
loopback behind it and believes nginx's X-Forwarded-For because nginx is its only trusted proxy.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tray_app.cli.input_errors import InputError

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


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

    def validate(self) -> Deployment:
        if not _DOMAIN.match(self.domain.lower()):
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
        return self

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


def nginx_site(d: Deployment) -> str:
    return f"""# LM Gate behind nginx for {d.domain} — written by `lmgate deploy nginx`.
server {{
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
        proxy_pass http://127.0.0.1:{d.port};
        proxy_http_version 1.1;
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
    return f"""# LM Gate as a service — written by `lmgate deploy nginx`.
[Unit]
Description=LM Gate (authenticating gateway for LM Studio)
After=network-online.target
Wants=network-online.target

[Service]
User={d.user}
Group={d.user}
ExecStart={d.executable} serve --host 127.0.0.1 --port {d.port} --secret-store file
Environment=LMGATE_STORAGE_DATA_DIR=/var/lib/lmgate
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


def write(d: Deployment, directory: Path) -> tuple[Path, Path]:
    d.validate()
    directory.mkdir(parents=True, exist_ok=True)
    site = directory / "lmgate-nginx.conf"
    unit = directory / "lmgate.service"
    site.write_text(nginx_site(d), encoding="utf-8")
    unit.write_text(systemd_unit(d), encoding="utf-8")
    return site, unit
