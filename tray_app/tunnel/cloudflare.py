"""Cloudflare tunnels through the ``cloudflared`` agent: quick (no account) and named.

- Quick: ``cloudflared tunnel --url http://127.0.0.1:PORT`` gets a random
  ``https://*.trycloudflare.com``. The URL is read from the agent's own loopback metrics server
  (``GET /quicktunnel``, once ``GET /ready`` answers 200), never scraped from its log.
- Named (an account and a domain): ``cloudflared tunnel run`` with the tunnel token from the
  secret store in the agent's environment as ``TUNNEL_TOKEN`` — never in argv, which every
  local user can read; the public URL is the hostname routed to the tunnel in the dashboard.
- ``--no-autoupdate`` always: otherwise cloudflared downloads new versions of itself.
  ``--config`` names a private, empty config file of ours: ``~/.cloudflared/config.yml`` is not
  picked up, and the path on the agent's command line is the marker that proves it is ours.
- Every inherited ``TUNNEL_*`` variable is removed from the agent's environment: a
  ``TUNNEL_TOKEN`` in the user's shell must not turn a quick tunnel into someone's named one.
- The agent runs through :class:`AgentProcess` (PID file, a crash's leftover stopped at the
  next start, a redacted output tail); the token is redacted from every line it prints.
- Blocking work runs in threads; the event loop never waits on the process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tray_app.errors import SecretStoreError, TunnelError
from tray_app.secret_store.base import SecretStore
from tray_app.tunnel.agent_binary import Agent, AgentKind, find_agent
from tray_app.tunnel.agent_process import AgentProcess

log = logging.getLogger("lmgate.tunnel.cloudflare")

CLOUDFLARE_TUNNEL_TOKEN = "cloudflare-tunnel-token"  # noqa: S105 - the secret store's key
OPEN_TIMEOUT = 30.0
CLOSE_TIMEOUT = 15.0
POLL_INTERVAL = 0.2
METRICS_TIMEOUT = 2.0

# Advice text, not a secret.
TOKEN_HELP = (
    "Create a tunnel in the Cloudflare Zero Trust dashboard (Networks → Tunnels → Create a "  # noqa: S105
    "tunnel), copy the token from its install command, and run "
    "`lmgate tunnel set-token --provider cloudflare`."
)

# What a quick tunnel's name looks like; anything else from /quicktunnel is refused.
QUICK_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.trycloudflare\.com")
# The line in which the agent names its metrics server (cloudflared's own words).
_METRICS_AT = re.compile(r"Starting metrics server on (127\.0\.0\.1:\d{1,5})/metrics")
NO_TOKEN = "No Cloudflare tunnel token is set."  # noqa: S105 - advice, not a secret
QUICK_WARNING = (
    "Cloudflare quick tunnels are for trying things out: they come with no uptime promise and "
    "a new random URL every time they start."
)

CLOUDFLARED = AgentKind(
    program="cloudflared",
    setting="tunnel.cloudflared_path",
    version_args=("--version",),
    version=re.compile(r"cloudflared version (\d+\.\d+\.\d+)"),
    minimum=(2023, 2, 0),
    install_help=(
        "Install or update cloudflared from "
        "https://developers.cloudflare.com/cloudflare-one/connections/connect-networks/downloads/ "
        "(Cloudflare's apt and rpm repositories, `brew install cloudflared`, or `winget install "
        "--id Cloudflare.cloudflared`), then put it on your PATH or set tunnel.cloudflared_path."
    ),
)

RATE_LIMITED = (
    "Cloudflare is limiting how often quick tunnels may be created from this address: wait a "
    "few minutes and try again, or use a named tunnel (tunnel.provider = cloudflare-named)."
)
INVALID_TOKEN = (
    "Cloudflare refused the stored tunnel token (not valid, or its tunnel was deleted). "  # noqa: S105 - advice, not a secret
)
UNREACHABLE = (
    "cloudflared cannot reach Cloudflare: check your internet connection and that your "
    "firewall allows outbound connections to port 7844 (TCP and UDP)."
)

# What cloudflared prints -> the sentence with the fix; the first group wins over later ones.
_PROBLEMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"429 Too Many Requests|error code: 1015", re.IGNORECASE), RATE_LIMITED),
    (
        re.compile(
            r"Provided Tunnel token is not valid|Unauthorized: (Invalid tunnel secret|"
            r"Tunnel not found)",
            re.IGNORECASE,
        ),
        INVALID_TOKEN + TOKEN_HELP,
    ),
    (
        re.compile(
            r"failed to dial to edge|DialContext error|edge discovery|failed to request quick "
            r"Tunnel|Unable to establish connection with Cloudflare edge|:7844: i/o timeout",
            re.IGNORECASE,
        ),
        UNREACHABLE,
    ),
)

# Enough of a token to name it: any run of this many of its characters is redacted, so a
# line the agent printed in pieces (the output is read in bounded chunks) leaks none of it.
_FRAGMENT = 12
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z\s+")


def explain(line: str) -> tuple[int, str] | None:
    """(priority, sentence) for a line cloudflared prints when something people can fix is wrong."""
    for rank, (pattern, sentence) in enumerate(_PROBLEMS):
        if pattern.search(line):
            return rank, sentence
    return None


NOTHING_READ = "Nothing was read: the token was not changed."
_QUOTES = "\"'`"


def check_tunnel_token_shape(token: str) -> str:
    """The Cloudflare tunnel token in what was pasted: the token itself, or the dashboard's
    install command that carries it (``cloudflared tunnel run --token TOKEN``, ``sudo
    cloudflared service install TOKEN``), whose one word with the shape of a tunnel token
    (base64 of a JSON object with the account tag "a", the tunnel ID "t" and the secret "s")
    is taken. TunnelError if nothing was pasted, or if no word or more than one has that
    shape. The token itself is never part of the error."""
    if not token.strip():
        raise TunnelError(NOTHING_READ)
    found = {word for word in _words(token) if _is_tunnel_token(word)}
    if len(found) != 1:
        raise TunnelError(
            "That does not look like a Cloudflare tunnel token (the long text after `--token` "
            "in the dashboard's install command). " + TOKEN_HELP
        )
    return found.pop()


def _words(text: str) -> list[str]:
    """The words of a pasted command, quotes around a word and ``--token=`` before it taken off."""
    words = []
    for word in text.split():
        word = word.strip(_QUOTES)
        if word.startswith("--token="):
            word = word.removeprefix("--token=").strip(_QUOTES)
        words.append(word)
    return words


def _is_tunnel_token(word: str) -> bool:
    if not re.fullmatch(r"[A-Za-z0-9+/_\-]{40,4096}={0,2}", word):
        return False
    try:
        document = json.loads(_decode(word))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and all(
        isinstance(document.get(key), str) and document[key].strip() for key in ("a", "t", "s")
    )


def _decode(token: str) -> str:
    """The text a token encodes (standard or URL-safe base64, padding optional)."""
    alphabet = b"-_" if ("-" in token or "_" in token) else None
    padded = token.rstrip("=") + "=" * (-len(token.rstrip("=")) % 4)
    return base64.b64decode(padded, altchars=alphabet, validate=True).decode("utf-8")


def _secret_of(token: str) -> str | None:
    with contextlib.suppress(binascii.Error, ValueError, UnicodeDecodeError, AttributeError):
        secret = json.loads(_decode(token)).get("s")
        return secret if isinstance(secret, str) and len(secret) >= _FRAGMENT else None
    return None


class Redactor:
    """Replaces a secret, and every fragment of it of ``_FRAGMENT`` characters or more."""

    def __init__(self, *secrets: str | None) -> None:
        self._secrets = [s for s in secrets if s and len(s) >= _FRAGMENT]
        self._grams = {
            s[i : i + _FRAGMENT] for s in self._secrets for i in range(len(s) - _FRAGMENT + 1)
        }

    def __call__(self, text: str) -> str:
        if not self._grams:
            return text
        for secret in self._secrets:
            text = text.replace(secret, "[token]")
        hidden = [False] * len(text)
        for i in range(len(text) - _FRAGMENT + 1):
            if text[i : i + _FRAGMENT] in self._grams:
                for j in range(i, i + _FRAGMENT):
                    hidden[j] = True
        if not any(hidden):
            return text
        out: list[str] = []
        for i, char in enumerate(text):
            if not hidden[i]:
                out.append(char)
            elif i == 0 or not hidden[i - 1]:
                out.append("[token]")
        return "".join(out)


# The metrics server is on loopback: never through a proxy from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _metrics_get(address: str, path: str) -> tuple[int, Any]:
    """(status, JSON answer or None) of GET ``path`` on the agent's metrics server; status 0
    if it does not answer (yet)."""
    try:
        # A loopback URL we built from a port we chose.
        with _LOCAL.open(f"http://{address}{path}", timeout=METRICS_TIMEOUT) as answer:
            status, body = int(answer.status), answer.read(65536)
    except urllib.error.HTTPError as exc:
        status, body = int(exc.code), b""
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body.decode("utf-8")) if body else None
    except ValueError:
        return status, None


def agent_environment(token: str | None) -> dict[str, str]:
    """LM Gate's environment without any ``TUNNEL_*`` variable; ``TUNNEL_TOKEN`` only if given."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TUNNEL_")}
    if token is not None:
        env["TUNNEL_TOKEN"] = token
    return env


class CloudflareProvider:
    # Cloudflare replaces whatever the client sent in CF-Connecting-IP with its one address.
    forwarded_header: str | None = "CF-Connecting-IP"

    def __init__(
        self,
        secrets: SecretStore,
        state_dir: Path,
        *,
        named: bool = False,
        agent_path: str = "",
        hostname: str = "",
        scheme: str = "https",
        open_timeout: float = OPEN_TIMEOUT,
        quick_host: re.Pattern[str] = QUICK_HOST,
    ) -> None:
        self._secrets = secrets
        self._dir = state_dir
        self._named = named
        self._agent_path = agent_path
        self._hostname = hostname.strip().rstrip("/")
        if "://" in self._hostname:
            self._hostname = self._hostname.split("://", 1)[1]
        self._scheme = scheme
        self._open_timeout = open_timeout
        self._quick_host = quick_host
        self._metrics: str | None = None  # where the agent said its metrics server listens
        self.name = "cloudflare-named" if named else "cloudflare-quick"
        self.warning: str | None = None if named else QUICK_WARNING
        self._on_lost: Callable[[str], None] | None = None
        self._redact = Redactor()
        self._problem: tuple[int, str] | None = None
        self._public = False
        self._lock = threading.Lock()
        self._agent = AgentProcess(
            CLOUDFLARED.program,
            self.pid_path,
            redact=self._redact_line,
            on_line=self._on_line,
            on_exit=self._on_exit,
        )

    @property
    def config_path(self) -> Path:
        return self._dir / "cloudflared.yml"

    @property
    def pid_path(self) -> Path:
        return self._dir / "cloudflared.pid"

    @property
    def agent_pid(self) -> int | None:
        return self._agent.pid

    def set_lost_callback(self, callback: Callable[[str], None]) -> None:
        self._on_lost = callback

    # ---- the public interface --------------------------------------------------------------

    async def open(self, local_port: int) -> str:
        if self._named and not self._hostname:
            # Both at once when both are missing: one run tells the whole story.
            token_too = "" if self._has_token() else f" Also: {NO_TOKEN} {TOKEN_HELP}"
            raise TunnelError(
                "Set the public hostname routed to this tunnel in the Cloudflare dashboard "
                "(--cloudflare-hostname, or tunnel.cloudflare_hostname); its service there must "
                f"be http://127.0.0.1:{local_port}.{token_too}"
            )
        token = self._load_token() if self._named else None
        # Proving the agent runs it (`--version`): in a thread, like every blocking call here.
        agent = await asyncio.to_thread(find_agent, CLOUDFLARED, self._agent_path)
        try:
            await asyncio.to_thread(self._start_blocking, agent, token, local_port)
            return await self._wait_until_public()
        except BaseException:
            # A failure, or a stop while opening: nothing of this opening is left behind.
            await asyncio.shield(self.close())
            raise

    async def close(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._close_blocking), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("the cloudflared agent did not stop within %g s", CLOSE_TIMEOUT)

    async def alive(self) -> bool:
        return self._agent.running

    def stop_stale_agent(self) -> bool:
        """Stop an agent of ours by its PID file (left by a crash, or for a second stop signal,
        from any thread); True if one was stopped."""
        stopped = AgentProcess(CLOUDFLARED.program, self.pid_path).stop_stale()
        if stopped:
            self.config_path.unlink(missing_ok=True)
        return stopped

    # ---- opening ---------------------------------------------------------------------------

    def _has_token(self) -> bool:
        try:
            return bool(self._secrets.get(CLOUDFLARE_TUNNEL_TOKEN))
        except SecretStoreError:
            return False

    def _load_token(self) -> str:
        try:
            token = self._secrets.get(CLOUDFLARE_TUNNEL_TOKEN)
        except SecretStoreError as exc:
            raise TunnelError(f"The Cloudflare tunnel token could not be read: {exc}") from None
        if not token:
            raise TunnelError(f"{NO_TOKEN} {TOKEN_HELP}")
        return check_tunnel_token_shape(token)

    def _write_private_config(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir.chmod(0o700)
        temporary = self.config_path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            # Nothing to configure: the file exists so that no other config file is read.
            handle.write("# LM Gate's private cloudflared configuration: nothing to set.\n{}\n")
        temporary.replace(self.config_path)

    def _start_blocking(self, agent: Agent, token: str | None, local_port: int) -> None:
        """Start the agent; it says where its metrics server listens (see _on_line)."""
        with self._lock:
            self._public = False
            self._problem = None
            self._metrics = None
            self._redact = Redactor(token, _secret_of(token) if token else None)
            self.stop_stale_agent()
            self._write_private_config()
            argv = [
                str(agent.path),
                "tunnel",
                "--no-autoupdate",
                "--config",
                str(self.config_path),
                # Port 0: the agent binds a port of the kernel's choosing and names it on its
                # own output, which only it writes. A port LM Gate picked and freed could be
                # taken first by a local process that then answers /quicktunnel with its own
                # host: the URL, and the pairing QR code, would point there.
                "--metrics",
                "127.0.0.1:0",
                "--loglevel",
                "info",
            ]
            argv += ["run"] if self._named else ["--url", f"http://127.0.0.1:{local_port}"]
            try:
                self._agent.start(argv, agent_environment(token), marker=str(self.config_path))
            except OSError as exc:
                raise TunnelError(
                    f"cloudflared ({agent.path}) could not be started: {exc.strerror or exc}. "
                    + CLOUDFLARED.install_help
                ) from None
            log.info("started cloudflared %s (pid %s)", agent.version, self._agent.pid)

    async def _wait_until_public(self) -> str:
        deadline = time.monotonic() + self._open_timeout
        while True:
            if not self._agent.running:
                raise TunnelError(await asyncio.to_thread(self._exit_sentence))
            metrics = self._metrics
            status = 0
            if metrics is not None:
                status, _ = await asyncio.to_thread(_metrics_get, metrics, "/ready")
            if status == 200 and metrics is not None:
                hostname = self._hostname
                if not self._named:
                    _, answer = await asyncio.to_thread(_metrics_get, metrics, "/quicktunnel")
                    found = answer.get("hostname") if isinstance(answer, dict) else None
                    hostname = found.strip().lower() if isinstance(found, str) else ""
                    if hostname and not self._quick_host.fullmatch(hostname):
                        # Our own agent's answer, but not a quick tunnel's name: never a URL
                        # to hand to phones (or a host for the gateway to answer to).
                        raise TunnelError(
                            "cloudflared reported a quick tunnel at an unexpected address "
                            f"({hostname[:80]!r}, not a trycloudflare.com name), so LM Gate "
                            "did not use it; check that tunnel.cloudflared_path is "
                            "Cloudflare's own cloudflared."
                        )
                if hostname:
                    # Public first: an exit from now on is reported as a loss, and one just
                    # before is seen here.
                    self._public = True
                    if not self._agent.running:
                        self._public = False
                        raise TunnelError(await asyncio.to_thread(self._exit_sentence))
                    url = f"{self._scheme}://{hostname}"
                    log.info("cloudflared tunnel is ready at %s", url)
                    return url
            if time.monotonic() >= deadline:
                problem = self._problem
                raise TunnelError(
                    problem[1]
                    if problem
                    else f"cloudflared did not open a tunnel within {self._open_timeout:g} s; "
                    "check your internet connection and try again."
                )
            await asyncio.sleep(POLL_INTERVAL)

    def _exit_sentence(self) -> str:
        """Why the agent ended before it was ready (blocking: the agent's last lines may still
        be on their way through the output thread)."""
        tail = self._agent.tail()
        for _ in range(10):
            time.sleep(0.05)
            if (now := self._agent.tail()) == tail:
                break
            tail = now
        problem = self._problem
        if problem is not None:
            return problem[1]
        code = self._agent.returncode
        lines = [_TIMESTAMP.sub("", line).strip() for line in self._agent.tail()]
        last = next((line for line in reversed(lines) if line), "")
        said = f": {last[:200]}" if last else ""
        return f"cloudflared exited before the tunnel was ready (exit status {code}){said}"

    # ---- the agent's threads ---------------------------------------------------------------

    def _redact_line(self, line: str) -> str:
        return self._redact(line)

    def _on_line(self, line: str) -> None:
        """Runs on the agent's output thread, for every (already redacted) line."""
        if self._metrics is None and (where := _METRICS_AT.search(line)):
            self._metrics = where.group(1)
        found = explain(line)
        if found is not None and (self._problem is None or found[0] < self._problem[0]):
            self._problem = found
        if " ERR " in f" {line} " or found is not None:
            log.warning("cloudflared: %s", line[:500])
        else:
            log.debug("cloudflared: %s", line[:500])

    def _on_exit(self, code: int) -> None:
        """Runs on the agent's watcher thread when it exits without being asked to."""
        if self._public and self._on_lost is not None:
            self._public = False
            self._on_lost(f"the cloudflared agent exited (code {code})")

    # ---- closing ---------------------------------------------------------------------------

    def _close_blocking(self) -> None:
        with self._lock:
            self._public = False
            try:
                self._agent.stop()
            except Exception:  # close never raises
                log.exception("stopping the cloudflared agent failed")
            self.pid_path.unlink(missing_ok=True)
            self.config_path.unlink(missing_ok=True)
