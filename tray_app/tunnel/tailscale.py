"""Tailscale Serve (HTTPS on the owner's tailnet) and Funnel (public), through the `tailscale` CLI.

- tailscaled is the owner's system daemon, not ours: LM Gate only runs the CLI, in its
  FOREGROUND mode (``tailscale serve|funnel --https=N http://127.0.0.1:PORT``). tailscaled keys
  a foreground serve config to that CLI's session and removes it when the CLI goes, however it
  goes (Ctrl-C, SIGTERM, SIGKILL). The CLI itself ends with LM Gate on Linux, even after a
  crash (PR_SET_PDEATHSIG, see agent_process); elsewhere a crash's leftover runs until the next
  open stops it. ``--bg`` (a config that outlives us) and ``serve reset`` (which wipes the
  owner's other serve configs) are never run.
- Before starting it, ``tailscale status --json`` says whether Tailscale is signed in and
  running, the machine's MagicDNS name (the public URL is built from it) and whether HTTPS
  certificates and Funnel are enabled; each missing piece is one sentence with the fix.
- The CLI runs through :class:`AgentProcess`: its own session, a PID file naming it, a crash's
  leftover stopped at the next open (only if its command line still carries our marker),
  output read on a thread with a short redacted tail. Its exit while open is a lost tunnel.
- tailscaled's reverse proxy dials the gateway from loopback and sets X-Forwarded-For to the
  tailnet (or, for Funnel, internet) client's address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from tray_app.errors import TunnelError
from tray_app.tunnel.agent_binary import Agent, AgentKind, find_agent, kill_group
from tray_app.tunnel.agent_process import AgentProcess

log = logging.getLogger("lmgate.tunnel.tailscale")

TAILSCALE = AgentKind(
    program="tailscale",
    setting="tunnel.tailscale_path",
    version_args=("version",),
    version=re.compile(r"^(\d+\.\d+\.\d+)", re.M),
    # Foreground serve configs keyed to the CLI's session, removed when it exits.
    minimum=(1, 52, 0),
    install_help=(
        "Install or update Tailscale from https://tailscale.com/download and sign in, then put "
        "`tailscale` on your PATH or set tunnel.tailscale_path."
    ),
)
# The only ports Funnel serves on.
FUNNEL_PORTS = (443, 8443, 10000)
OPEN_TIMEOUT = 30.0
STATUS_TIMEOUT = 10.0
CLOSE_TIMEOUT = 15.0
DNS_ADMIN = "https://login.tailscale.com/admin/dns"
ACL_ADMIN = "https://login.tailscale.com/admin/acls"
FUNNEL_DOCS = "https://tailscale.com/kb/1223/funnel"

_ENABLE_URL = re.compile(r"https://login\.tailscale\.com/f/[^\s\"'<>`]+")
# What may name something private in the CLI's output: a sign-in link (whoever opens it may
# add this machine to their tailnet) and auth keys.
_SECRETS = (
    (re.compile(r"https://login\.tailscale\.com/a/[^\s\"'<>`]+"), "[sign-in link]"),
    (re.compile(r"tskey-[A-Za-z0-9_\-]+"), "[auth key]"),
)
_NO_DAEMON = (
    "failed to connect to local tailscale",
    "doesn't appear to be running",
    "is tailscaled running",
    "tailscaled not running",
)
_AGAIN = "then go public again."
_OPENING_LINES = 200  # what is kept of the CLI's output while it opens


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _short(text: str) -> str:
    return redact(text).strip()[:200]


class TailscaleProvider:
    # tailscaled's proxy dials the gateway from loopback and sets the client's address here.
    forwarded_header: str | None = "X-Forwarded-For"

    def __init__(
        self,
        state_dir: Path,
        *,
        funnel: bool = False,
        agent_path: str = "",
        https_port: int = 443,
        scheme: str = "https",
        open_timeout: float = OPEN_TIMEOUT,
        funnel_ports: Collection[int] = FUNNEL_PORTS,
    ) -> None:
        self._dir = state_dir
        self._funnel = funnel
        self._agent_path = agent_path
        self._https_port = https_port
        self._scheme = scheme
        self._open_timeout = open_timeout
        self._funnel_ports = tuple(funnel_ports)
        self.name = "tailscale-funnel" if funnel else "tailscale-serve"
        # Serve reaches only the owner's tailnet and Funnel is as public as ngrok: the choice's
        # name says which, and neither carries a security caveat (both are HTTPS end to end).
        self.warning: str | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._changed = threading.Event()
        self._ready = False
        self._enable_url: str | None = None
        self._exit_code: int | None = None
        self._lines: list[str] = []
        self._name = ""
        self._attempt = 0  # every open and close counts one: an older opening gives up
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()  # a close and a start do not interleave
        self._process = AgentProcess(
            "tailscale", self.pid_path, redact=redact, on_line=self._line, on_exit=self._exited
        )

    @property
    def verb(self) -> str:
        return "funnel" if self._funnel else "serve"

    @property
    def feature(self) -> str:
        return "Funnel" if self._funnel else "Serve"

    @property
    def pid_path(self) -> Path:
        return self._dir / "tailscale.pid"

    @property
    def agent_pid(self) -> int | None:
        return self._process.pid

    def set_lost_callback(self, callback: Callable[[str], None]) -> None:
        self._on_lost = callback

    # ---- the public interface --------------------------------------------------------------

    async def open(self, local_port: int) -> str:
        self._check_port()
        with self._lock:
            self._attempt += 1
            attempt = self._attempt
        agent = await asyncio.to_thread(find_agent, TAILSCALE, self._agent_path)
        name = await asyncio.to_thread(self._preflight, agent)
        try:
            return await asyncio.to_thread(self._open_blocking, agent, name, local_port, attempt)
        except asyncio.CancelledError:
            # The thread goes on: a close makes it stop the CLI and give up at once.
            await self.close()
            raise

    async def close(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._close_blocking), CLOSE_TIMEOUT)
        except (TimeoutError, OSError) as exc:  # never raises
            log.warning("stopping the tailscale CLI failed: %r", exc)

    async def alive(self) -> bool:
        return self._ready and self._process.running

    def stop_stale_agent(self) -> bool:
        """Stop a CLI of ours left by a crash (by the PID file); True if one was stopped."""
        return self._process.stop_stale()

    # ---- before anything runs ------------------------------------------------------------

    def _check_port(self) -> None:
        problem = port_problem(
            self._https_port, funnel=self._funnel, funnel_ports=self._funnel_ports
        )
        if problem is not None:
            raise TunnelError(problem)

    def _preflight(self, agent: Agent) -> str:
        """The machine's MagicDNS name, once ``tailscale status --json`` shows it can serve."""
        return check_ready(
            agent, funnel=self._funnel, https_port=self._https_port, funnel_ports=self._funnel_ports
        )

    # ---- the foreground CLI, run in a thread ---------------------------------------------

    def _open_blocking(self, agent: Agent, name: str, local_port: int, attempt: int) -> str:
        # LM Gate's own state directory for this provider: private, even one an older
        # version made wider.
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir.chmod(0o700)
        tail = f"--https={self._https_port} http://127.0.0.1:{local_port}"
        argv = [str(agent.path), self.verb, *tail.split(" ")]
        with self._start_lock:
            if self._attempt != attempt:
                raise TunnelError(self._went_private)
            with self._lock:
                self._ready = False
                self._enable_url = None
                self._exit_code = None
                self._lines = []
                self._name = name
            self._changed.clear()
            # A crash's leftover first, by the PID file (start() would begin by removing it),
            # then start() stops our previous CLI, if any, and starts this one.
            self._process.stop_stale()
            try:
                self._process.start(argv, os.environ, marker=f"{self.verb} {tail}")
            except OSError as exc:
                raise TunnelError(
                    f"{agent.path} could not be run ({exc.strerror or exc}). "
                    + TAILSCALE.install_help
                ) from None
        deadline = time.monotonic() + self._open_timeout
        while True:
            if self._attempt != attempt:
                raise TunnelError(self._went_private)  # closed meanwhile: the CLI is stopped
            problem = self._problem()
            if problem is not None:
                self._process.stop()
                raise TunnelError(problem)
            if self._ready:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._process.stop()
                raise TunnelError(
                    f"Tailscale {self.feature} did not start within {self._open_timeout:g} s: "
                    f"check that Tailscale is connected (`tailscale status`), {_AGAIN}"
                )
            self._changed.wait(min(remaining, 0.5))
            self._changed.clear()
        url = public_url(self._scheme, name, self._https_port)
        log.info("tailscale %s is serving %s", self.verb, url)
        return url

    @property
    def _went_private(self) -> str:
        return f"LM Gate went private before Tailscale {self.feature} finished starting."

    def _close_blocking(self) -> None:
        with self._start_lock:
            with self._lock:
                self._attempt += 1
                self._ready = False
            self._changed.set()
            self._process.stop()

    def _line(self, line: str) -> None:
        """Runs on the output thread for every (redacted) line the CLI prints."""
        with self._lock:
            if not self._ready and len(self._lines) < _OPENING_LINES:
                self._lines.append(line)
            found = _ENABLE_URL.search(line)
            if found and self._enable_url is None:
                self._enable_url = found.group(0).rstrip(".,;:")
            elif "Press Ctrl+C to exit" in line or _names_url(line, self._name):
                self._ready = True
        self._changed.set()

    def _exited(self, code: int) -> None:
        """Runs on the watcher thread when the CLI exits without being asked to."""
        with self._lock:
            self._exit_code = code
            was_ready = self._ready
            self._ready = False
        self._changed.set()
        if was_ready and self._on_lost is not None:
            log.warning("the tailscale CLI exited (code %d)", code)
            self._on_lost(f"the tailscale {self.verb} command exited (code {code})")

    def _problem(self) -> str | None:
        """What went wrong while opening, as one sentence; None while nothing has."""
        with self._lock:
            enable_url, code = self._enable_url, self._exit_code
            seen = list(self._lines)
        if enable_url is None and code is None:
            return self._refusal(" ".join(seen))
        if enable_url is None:
            # Exited before it was ready (after the enable text too, when control says not to
            # wait): what it said, read to the end.
            seen = self._final_output()
            found = _ENABLE_URL.search(" ".join(seen))
            enable_url = found.group(0).rstrip(".,;:") if found else None
        if enable_url is not None:
            text = " ".join(seen)
            feature = "Funnel" if "Funnel" in text else "Serve" if "Serve" in text else None
            feature = feature or ("HTTPS" if "HTTPS" in text else self.feature)
            return (
                f"Tailscale {feature} is not enabled for your tailnet: open {enable_url} to "
                f"enable it, {_AGAIN}"
            )
        lines = [line for line in seen if line.strip()]
        return self._refusal(" ".join(lines)) or (
            f"The tailscale {self.verb} command stopped before it was ready ("
            + (_short(lines[-1]) if lines else f"exit status {code}")
            + f"); {_AGAIN}"
        )

    def _final_output(self) -> list[str]:
        """The exited CLI's last lines: its output thread may still be reading them."""
        previous: list[str] = []
        for _ in range(20):
            lines = self._process.tail()
            if lines and lines == previous:
                break
            previous = lines
            time.sleep(0.05)
        return previous

    def _refusal(self, text: str) -> str | None:
        port, verb = self._https_port, self.verb
        lower = text.lower()
        if "access denied" in lower or "serve config denied" in lower:
            return (
                f"Tailscale does not let this user account change its {self.feature} settings: "
                f"run `sudo tailscale set --operator=$USER` once, {_AGAIN}"
            )
        if "background configuration already exists" in lower or "already serving" in lower:
            return (
                f"Port {port} of this computer's Tailscale name is already served by a "
                f"background configuration: turn it off with `tailscale {verb} --https={port} "
                f"off` or pick another tunnel.tailscale_https_port, {_AGAIN}"
            )
        if "foreground already exists" in lower:
            return (
                f"Another `tailscale serve` or `tailscale funnel` is serving port {port} in a "
                "terminal: stop it or pick another tunnel.tailscale_https_port, " + _AGAIN
            )
        if any(sign in lower for sign in _NO_DAEMON):
            return (
                "Tailscale's service (tailscaled) is not running on this computer: start the "
                "Tailscale app (or `sudo systemctl start tailscaled`), " + _AGAIN
            )
        return None


def port_problem(
    port: int, *, funnel: bool, funnel_ports: Collection[int] = FUNNEL_PORTS
) -> str | None:
    """Why tunnel.tailscale_https_port cannot be served on, as one sentence; None if it can."""
    if not 1 <= port <= 65535:
        return (
            f"tunnel.tailscale_https_port is {port}, which is not a port: use 443 (or "
            "another number from 1 to 65535)."
        )
    if funnel and port not in funnel_ports:
        allowed = ", ".join(str(p) for p in funnel_ports)
        return (
            f"Tailscale Funnel serves only on ports {allowed}, and "
            f"tunnel.tailscale_https_port is {port}: set it to one of those."
        )
    return None


def check_ready(
    agent: Agent,
    *,
    funnel: bool,
    https_port: int,
    funnel_ports: Collection[int] = FUNNEL_PORTS,
) -> str:
    """The machine's MagicDNS name if Tailscale can serve (``funnel``: publicly) on
    ``https_port``; TunnelError with the one sentence that says what to fix if not. What the
    provider checks before it runs the CLI, and what `lmgate doctor` reports."""
    problem = port_problem(https_port, funnel=funnel, funnel_ports=funnel_ports)
    if problem is not None:
        raise TunnelError(problem)
    return ready_name(_status(agent), funnel=funnel)


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def ready_name(status: dict[str, Any], *, funnel: bool) -> str:
    """The MagicDNS name in a ``tailscale status --json`` document, if it shows this machine
    can serve (``funnel``: publicly); TunnelError with the sentence that says what to fix."""
    feature = "Funnel" if funnel else "Serve"
    state = status.get("BackendState")
    if state != "Running":
        raise TunnelError(_state_sentence(str(state)))
    me = status.get("Self")
    me = me if isinstance(me, dict) else {}
    name = str(me.get("DNSName") or "").rstrip(".").lower()
    if not name:
        raise TunnelError(
            "This computer has no Tailscale name because MagicDNS is off for your "
            f"tailnet: enable MagicDNS and HTTPS certificates at {DNS_ADMIN}, {_AGAIN}"
        )
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        # It becomes the URL phones get and the host the gateway answers to: only a name.
        raise TunnelError(
            f"Tailscale named this computer {name[:80]!r}, which is not a DNS name, so LM Gate "
            "did not use it; check that tunnel.tailscale_path is Tailscale's own tailscale."
        )
    caps = _capabilities(me)
    if "https" not in caps:
        raise TunnelError(
            "HTTPS certificates are off for your tailnet, and Tailscale "
            f"{feature} needs them: enable them at {DNS_ADMIN}, {_AGAIN}"
        )
    if funnel and "funnel" not in caps:
        raise TunnelError(
            "Funnel is not enabled for this tailnet or device: add the `funnel` node "
            f"attribute for this device in the access controls ({ACL_ADMIN}; see "
            f"{FUNNEL_DOCS}), with HTTPS certificates on, {_AGAIN}"
        )
    return name


def _status(agent: Agent) -> dict[str, Any]:
    command = [str(agent.path), "status", "--json"]
    try:
        # The agent was proven by its version command; no shell.
        proc = subprocess.Popen(  # noqa: S603
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=os.name != "nt",
        )
    except OSError as exc:
        raise TunnelError(
            f"{agent.path} could not be run ({exc.strerror or exc}). {TAILSCALE.install_help}"
        ) from None
    with proc:
        try:
            out, err = proc.communicate(timeout=STATUS_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.communicate()
            raise TunnelError(
                f"Tailscale did not answer `tailscale status` within {STATUS_TIMEOUT:g} s: "
                f"check that Tailscale is running (start the Tailscale app or the "
                f"tailscaled service), {_AGAIN}"
            ) from None
    text = out.decode(errors="replace")
    errors = err.decode(errors="replace")
    try:
        status = json.loads(text)
    except ValueError:
        status = None
    if isinstance(status, dict):
        return status
    said = f"{errors}\n{text}"
    if any(sign in said.lower() for sign in _NO_DAEMON):
        raise TunnelError(
            "Tailscale's service (tailscaled) is not running on this computer: start the "
            "Tailscale app (or `sudo systemctl start tailscaled`), " + _AGAIN
        )
    lines = [line for line in said.splitlines() if line.strip()]
    detail = _short(lines[-1]) if lines else f"exit status {proc.returncode}"
    raise TunnelError(f"`tailscale status --json` failed ({detail}); {_AGAIN}")


def _state_sentence(state: str) -> str:
    if state == "NeedsLogin":
        return (
            "Tailscale is not signed in on this computer: run `tailscale up` (or sign in "
            "from the Tailscale app), " + _AGAIN
        )
    if state == "Stopped":
        return (
            "Tailscale is switched off on this computer: run `tailscale up` (or turn it "
            "on in the Tailscale app), " + _AGAIN
        )
    if state == "NeedsMachineAuth":
        return (
            "This computer is waiting for a tailnet admin to approve it: approve it at "
            "https://login.tailscale.com/admin/machines, " + _AGAIN
        )
    if state in {"Starting", "NoState"}:
        return "Tailscale is still connecting: wait a moment, " + _AGAIN
    return f"Tailscale is not connected (state {state[:40]!r}): check `tailscale status`, " + _AGAIN


def public_url(scheme: str, name: str, port: int) -> str:
    """The URL tailscaled serves the machine's name on (443 is HTTPS's own port)."""
    return f"{scheme}://{name}" if port == 443 else f"{scheme}://{name}:{port}"


def _capabilities(me: dict[str, Any]) -> set[str]:
    """The node's capabilities: Self.CapMap's keys (1.54+) and Self.Capabilities."""
    caps: set[str] = set()
    cap_map = me.get("CapMap")
    if isinstance(cap_map, dict):
        caps.update(str(key) for key in cap_map)
    listed = me.get("Capabilities")
    if isinstance(listed, list):
        caps.update(str(item) for item in listed)
    caps.discard("")
    return caps


def _names_url(line: str, name: str) -> bool:
    """Whether ``line`` is the URL line of the CLI's "Available ..." message for ``name``."""
    text = line.strip().lower()
    return bool(name) and text.startswith(f"https://{name.lower()}")
