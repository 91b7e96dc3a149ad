"""``lmgate deploy compose``: the team gateway (README "Team gateway") as one Compose project.

nginx terminates TLS in front of N replicas that share PostgreSQL and Redis. The site is the
one ``lmgate deploy nginx --replica lmgate-1:8787 ...`` writes (its code, not a copy), with the
certificate paths inside the nginx container. Two networks: ``edge`` (nginx and the replicas;
nginx has a fixed address there, the only proxy the replicas trust) and ``state``, internal
(no route out to the world), which only the replicas, PostgreSQL and Redis join. The host can
still reach containers on it: their passwords are what protects them.

The secrets are made here, once: the PostgreSQL volume is initialised with the first password,
so a rerun keeps every secret file and rewrites only compose.yaml and the nginx site. No secret
is printed or written into compose.yaml; they reach the containers through an env file, a
mounted password file and a mounted Redis config (never a command line, which ``ps`` shows to
every local user).

The directory is trusted with secrets and with what nginx and Compose load, so it and its
subdirectories must be the user's own, not symbolic links, and writable by nobody else; every
file is written through a directory descriptor opened without following links.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from tray_app.cli.deploy import Deployment, nginx_site
from tray_app.cli.input_errors import InputError
from tray_app.config.parsers import upstream_url
from tray_app.config.settings import Config

MAX_REPLICAS = 8
PORT = 8787  # the image's own
TLS_DIR = "/etc/nginx/tls"  # where nginx's container sees DIR/tls
ACME_DIR = "/var/www/html"  # the site's root for certbot's HTTP challenge (deploy.nginx_site)
# The edge network is fixed so nginx's address is known before anything starts: the replicas
# trust X-Forwarded-For from that one address. The default lies outside Docker's default
# address pools (172.17-31.x, 192.168.x), so it meets no network Docker makes by itself
# (--subnet moves it off a LAN or VPN that uses it). Dynamic addresses only in its lower half,
# nginx's the last one: no replica (created before nginx, which depends on them) can take it.
EDGE_SUBNET = "10.87.87.0/27"
SECRET_FILES = ("lmgate.env", "postgres-password", "redis.conf")
# redis.conf is bind-mounted and read by Redis as its own user (uid 999), not by the user who
# runs Compose, so it must be readable by others; the 0700 directory around it keeps every
# other local user out, while the container sees the file itself. The PostgreSQL password is
# read by the image's entrypoint as root, before it drops to postgres.
SECRET_MODES = {"lmgate.env": 0o600, "postgres-password": 0o600, "redis.conf": 0o644}
# Each directory's mode, set on every run: tls/ is read by nginx's master (root), acme/ and
# nginx/ by its workers.
DIRECTORIES = {"secrets": 0o700, "tls": 0o700, "nginx": 0o755, "acme": 0o755}
PEMS = ("privkey.pem", "fullchain.pem")  # certbot's names
# An image reference ([registry[:port]/]name[:tag][@digest]): nothing else can reach the YAML.
_IMAGE = re.compile(
    r"(?:[a-z0-9.-]+(?::[0-9]{1,5})?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?"
)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def edge_network(subnet: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise InputError(
            "--subnet", f"{subnet!r} is not an IPv4 network like {EDGE_SUBNET}: {exc}"
        ) from None
    # The networks for private use (RFC 1918) only: is_private also takes loopback,
    # link-local and reserved ranges, which no bridge should claim.
    if not 16 <= network.prefixlen <= 28 or not any(
        network.subnet_of(block) for block in PRIVATE_BLOCKS
    ):
        raise InputError(
            "--subnet",
            f"{subnet} must be a private IPv4 network (in 10.0.0.0/8, 172.16.0.0/12 or "
            f"192.168.0.0/16) of /16 to /28 (default {EDGE_SUBNET})",
        )
    return network


PRIVATE_BLOCKS = tuple(
    ipaddress.IPv4Network(block) for block in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)


@dataclass(frozen=True, slots=True)
class ComposeDeployment:
    domain: str
    replicas: int = 2
    upstream_url: str = "http://host.docker.internal:1234"
    image: str = "lmgate"
    subnet: str = EDGE_SUBNET

    def validate(self) -> ComposeDeployment:
        """Checked, and normalised as it will be written (the URL as LM Gate reads it)."""
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise InputError(
                "--replicas", f"must be between 1 and {MAX_REPLICAS}, got {self.replicas}"
            )
        try:
            url = upstream_url(self.upstream_url)
        except ValueError as exc:
            raise InputError("--upstream-url", str(exc)) from None
        if not _IMAGE.fullmatch(self.image):
            raise InputError(
                "--image", f"{self.image!r} is not an image name like lmgate or lmgate:1.4"
            )
        self.site.validate()  # the domain, checked as `deploy nginx` checks it
        network = edge_network(self.subnet)
        # The replicas take addresses from the lower half, less its network address and the
        # bridge's gateway.
        room = network.num_addresses // 2 - 2
        if self.replicas > room:
            raise InputError(
                "--subnet",
                f"{network} has room for {room} replicas, not {self.replicas}: choose a larger one",
            )
        return dataclasses.replace(
            self, domain=self.domain.lower(), upstream_url=url, subnet=str(network)
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"lmgate-{n}" for n in range(1, self.replicas + 1))

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def nginx_address(self) -> str:
        return str(self.network.broadcast_address - 1)

    @property
    def dynamic_range(self) -> str:
        return str(next(self.network.subnets(prefixlen_diff=1)))

    @property
    def site(self) -> Deployment:
        """What `deploy nginx` would be given for these replicas, inside the nginx container."""
        return Deployment(
            domain=self.domain,
            replicas=tuple(f"{name}:{PORT}" for name in self.names),
            certificate=f"{TLS_DIR}/fullchain.pem",
            certificate_key=f"{TLS_DIR}/privkey.pem",
        )


NGINX_ADDRESS = ComposeDeployment("x.example").nginx_address  # with the default subnet


def _quoted(text: str) -> str:
    # A JSON string is a YAML double-quoted scalar: nothing in a value can become structure;
    # `$$` is Compose's `$`, so no value takes a variable from whoever runs it.
    return json.dumps(text.replace("$", "$$"))


def _nginx_command(tls: Path) -> str:
    """nginx only once the certificate is there; else one line saying where it goes."""
    where = shlex.quote(str(tls))
    script = (
        f"for f in {' '.join(reversed(PEMS))}; do "
        f'[ -s {TLS_DIR}/"$f" ] || {{ echo "lmgate: no certificate: put fullchain.pem and '
        f'privkey.pem in "{where}" on the host (README, With Docker Compose), then restart '
        f'nginx" >&2; exit 1; }}; done; '
        "exec nginx -g 'daemon off;'"
    )
    # $$: Compose would substitute $f itself.
    return _quoted(script)


def compose_file(d: ComposeDeployment, directory: Path) -> str:
    # stop: a running answer may finish (server.shutdown_grace) before Compose kills.
    grace = int(Config().server_shutdown_grace) + 5
    # Each replica's /data (its usage journal) a named volume: kept when the replica is
    # recreated, removed by `down -v` (an image's anonymous one can outlive both).
    replicas = "".join(
        f"  {name}:\n    <<: *lmgate\n    volumes: [{name}-data:/data]\n" for name in d.names
    )
    volumes = "".join(f"  {name}-data: {{}}\n" for name in d.names)
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
    LMGATE_SERVER_TRUSTED_PROXIES: "{d.nginx_address}/32"
  # The LMGATE_SECRET_* values: in the containers' environment (docker inspect shows them to
  # whoever may use Docker, which is root's equal anyway), never in a command line.
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
    # Refuses to start, in one line (docker compose logs nginx), without the certificate.
    command: ["sh", "-c", {_nginx_command(directory / "tls")}]
    ports:
      - "80:80"
      - "443:443"
    volumes:
      # The one site file, over the image's default site: nothing else in nginx/ is loaded.
      - ./nginx/lmgate.conf:/etc/nginx/conf.d/default.conf:ro
      - ./tls:{TLS_DIR}:ro
      - ./acme:{ACME_DIR}:ro   # certbot --webroot -w <this directory>/acme
    networks:
      edge:
        ipv4_address: {d.nginx_address}
    # The master: the ports, its workers' user, their temporary directories, and tls/ (0700,
    # the host user's: DAC_OVERRIDE, never DAC_READ_SEARCH, which lets open_by_handle_at
    # reach the host's files through a bind mount). The workers run with none of these.
    cap_drop: [ALL]
    cap_add: [CHOWN, SETUID, SETGID, NET_BIND_SERVICE, DAC_OVERRIDE]
    security_opt: ["no-new-privileges:true"]
    read_only: true
    tmpfs: [/var/cache/nginx, /var/lib/nginx, /run]   # /var/run is a link to /run
    # nginx resolves the replicas' names when it starts: restart it after one is recreated.
    depends_on:
{depends}    restart: unless-stopped

{replicas}
  postgres:
    image: postgres:15-bookworm
    environment:
      POSTGRES_USER: lmgate
      POSTGRES_DB: lmgate
      # Read from the mounted file: the password is in no environment docker inspect shows.
      POSTGRES_PASSWORD_FILE: /run/secrets/postgres-password
    volumes:
      - postgres-data:/var/lib/postgresql/data
      - ./secrets/postgres-password:/run/secrets/postgres-password:ro
    networks: [state]
    security_opt: ["no-new-privileges:true"]
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
    security_opt: ["no-new-privileges:true"]
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
        - subnet: {d.subnet}
          ip_range: {d.dynamic_range}
  state:
    # No route out to the world. The host (and its local users) can still reach containers
    # on it: the PostgreSQL and Redis passwords are what protects them.
    internal: true

volumes:
  postgres-data: {{}}
{volumes}"""


def _secret_texts() -> dict[str, str]:
    database, cache, signing = (secrets.token_urlsafe(32) for _ in range(3))
    return {
        "lmgate.env": (
            "# LM Gate's shared secrets, the same for every replica (`lmgate deploy compose`).\n"
            f"LMGATE_SECRET_STATE_DATABASE_URL=postgresql://lmgate:{database}@postgres:5432/lmgate\n"
            f"LMGATE_SECRET_STATE_REDIS_URL=redis://:{cache}@redis:6379/0\n"
            f"LMGATE_SECRET_JWT_SIGNING_KEY={signing}\n"
        ),
        # The PostgreSQL volume is initialised with this password: keep it.
        "postgres-password": database,
        "redis.conf": (
            f"# Mounted into the redis container (`lmgate deploy compose`).\nrequirepass {cache}\n"
        ),
    }


def _refuse(path: Path, why: str) -> InputError:
    return InputError("--output", f"{path} {why}")


def _check_directory(path: Path, st: os.stat_result) -> None:
    """A directory the user alone controls (what nginx, Compose and the secrets rely on)."""
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symbolic link: give the real directory, or remove the link")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is a file, not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(
            path, f"belongs to another user (uid {st.st_uid}): use a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(
            path, f"is writable by other users: run `chmod go-w {shlex.quote(str(path))}`"
        )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _check_output(directory: Path) -> bool:
    """Whether the secrets exist already. Refuses, before anything is written, a directory
    someone else could change and what a write would half do."""
    _check_parents(directory)
    st = _lstat(directory)
    if st is None:
        return False
    _check_directory(directory, st)
    for sub in DIRECTORIES:
        if (sub_st := _lstat(directory / sub)) is not None:
            _check_directory(directory / sub, sub_st)
    present = []
    for name in SECRET_FILES:
        path = directory / "secrets" / name
        if (file_st := _lstat(path)) is None:
            continue
        if not stat.S_ISREG(file_st.st_mode):
            raise _refuse(path, "is not a regular file: remove it")
        if file_st.st_uid != os.geteuid():
            raise _refuse(path, f"belongs to another user (uid {file_st.st_uid}): remove it")
        present.append(name)
    if present and len(present) != len(SECRET_FILES):
        missing = sorted(set(SECRET_FILES) - set(present))
        raise InputError(
            "--output",
            f"{directory / 'secrets'} holds {', '.join(present)} but not {', '.join(missing)}: "
            "restore them, or delete secrets/ and the project's volumes (docker compose down -v)",
        )
    return bool(present)


def _check_parents(directory: Path) -> None:
    """Every directory above the project: one another user may write to (without the sticky
    bit, as /tmp has) lets them move the project aside and put their own in its place before
    `docker compose up` runs it, as root. As OpenSSH's StrictModes checks."""
    for parent in directory.absolute().parents:
        st = parent.stat()
        if st.st_uid not in (0, os.geteuid()):
            raise _refuse(parent, f"belongs to another user (uid {st.st_uid}): pick another place")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise _refuse(
                parent, "may be written by others: choose another place, or `chmod go-w` it"
            )


def _open_directory(path: Path, parent: int | None, name: str, mode: int) -> int:
    """The directory's descriptor, made if missing, never through a link, checked and set to
    its mode."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent)
    fd = os.open(name, _OPEN_DIR, dir_fd=parent)
    try:
        _check_directory(path, os.fstat(fd))
        if parent is not None:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _replace(directory: int, name: str, text: str, mode: int) -> None:
    """A fresh file in its place (a link or someone's file there is replaced, not followed)."""
    temporary = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            os.fchmod(file.fileno(), mode)
        os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
        raise


def _write_secrets(directory: int, kept: bool) -> None:
    if kept:
        # Kept files get their modes back, whatever happened to them since.
        for name, mode in SECRET_MODES.items():
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise InputError("--output", f"secrets/{name} changed while writing: rerun")
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        return
    for name, text in _secret_texts().items():
        # Created with its mode: never readable by others, even for a moment.
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory
        )
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            os.fchmod(file.fileno(), SECRET_MODES[name])


def write(d: ComposeDeployment, directory: Path) -> tuple[list[Path], bool]:
    """Write the project: the files written, and whether the secrets were there already (and
    kept). Every check runs before the first file is written."""
    d = d.validate()
    directory = directory.absolute()
    kept = _check_output(directory)
    site = nginx_site(d.site)  # byte for byte what `deploy nginx` writes for these
    opened: list[int] = []
    try:
        if _lstat(directory) is None:
            directory.mkdir(mode=0o755, parents=True)
        top = _open_directory(directory, None, str(directory), 0o755)
        opened.append(top)
        fds = {}
        for sub, mode in DIRECTORIES.items():
            fds[sub] = _open_directory(directory / sub, top, sub, mode)
            opened.append(fds[sub])
        _replace(top, "compose.yaml", compose_file(d, directory), 0o644)
        _replace(fds["nginx"], "lmgate.conf", site, 0o644)
        _write_secrets(fds["secrets"], kept)
    except OSError as exc:
        raise InputError(
            "--output", f"cannot write {exc.filename or directory}: {exc.strerror}"
        ) from None
    finally:
        for fd in opened:
            os.close(fd)
    written = [directory / "compose.yaml", directory / "nginx" / "lmgate.conf"]
    if not kept:
        written += [directory / "secrets" / name for name in SECRET_FILES]
    return written, kept


def instructions(d: ComposeDeployment, directory: Path, secrets_kept: bool) -> str:
    d = d.validate()
    directory = directory.absolute()
    # Quoted: the commands are to be pasted into a shell, whatever the directory is called.
    compose = f"docker compose -f {shlex.quote(str(directory / 'compose.yaml'))}"
    tls = directory / "tls"
    key, chain = (shlex.quote(str(tls / name)) for name in PEMS)
    acme = shlex.quote(str(directory / "acme"))
    lineage = '"$RENEWED_LINEAGE"'
    hook = shlex.quote(
        f"cp {lineage}/fullchain.pem {lineage}/privkey.pem {shlex.quote(str(tls))}/"
        f" && {compose} exec -T nginx nginx -s reload"
    )
    kept = (
        "Kept the secrets already in secrets/ (the PostgreSQL volume knows that password).\n"
        if secrets_kept
        else "Made fresh secrets in secrets/ (keep them: the database is initialised with them).\n"
    )
    return f"""Wrote {directory / "compose.yaml"} and {directory / "nginx" / "lmgate.conf"} \
({d.replicas} {"replica" if d.replicas == 1 else "replicas"} sharing PostgreSQL and Redis).
{kept}
LM Studio: with the default --upstream-url, turn on "Serve on Local Network" (it then listens
on every address, port 1234, with no key) and let only the containers reach that port:

  sudo iptables -I INPUT -p tcp --dport 1234 ! -i lo ! -s {d.subnet} -j DROP
  sudo ip6tables -I INPUT -p tcp --dport 1234 ! -i lo -j DROP

Start with a self-signed certificate for {d.domain} in {tls} (nginx refuses to start
without one; `{compose} logs nginx` says so):

  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN={d.domain} \\
      -addext subjectAltName=DNS:{d.domain} -keyout {key} -out {chain}

Then, from LM Gate's repository:

  docker build -f packaging/Dockerfile -t {d.image} .
  {compose} up -d
  {compose} exec lmgate-1 lmgate key create my-laptop

Then the real certificate, renewed into {tls} with nginx reloaded:

  sudo certbot certonly --webroot -w {acme} -d {d.domain} --deploy-hook {hook}

Check it from anywhere: lmgate check https://{d.domain} <the key>

After a rerun of this command or a replica recreated (nginx reads its site and the
replicas' addresses when it starts): {compose} up -d && {compose} restart nginx
With fewer --replicas than before: {compose} up -d --remove-orphans
`{compose} down -v` deletes every key, device, conversation and audit entry.
"""
