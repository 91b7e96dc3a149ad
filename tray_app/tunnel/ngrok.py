"""ngrok through pyngrok, done carefully.

- The authtoken comes from the secret store and reaches the agent only through a config file
  created 0600 in LM Gate's private directory: never in argv (pyngrok would pass
  ``--authtoken``, visible to every local user), never in a log (the agent's own error text for
  ERR_NGROK_107 contains the token; it is redacted before anything is shown).
- The agent's API listens on a loopback port, its traffic inspector is off (``inspect: false``
  and no inspection database), so no request body or bearer token is recorded.
- A PID file marks our agent; an agent of ours left by a crash is stopped at the next start,
  identified by its command line naming our config file — never someone else's ngrok.
- pyngrok's calls block, so they run in a thread with timeouts; the event loop never waits.
- Only a proven agent is started (see :mod:`tray_app.tunnel.ngrok_agent`): pyngrok's own ``ngrok``
  script, which downloads ngrok, is never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyngrok import conf, ngrok
from pyngrok import process as pyngrok_process
from pyngrok.exception import PyngrokError
from pyngrok.log import NgrokLog
from pyngrok.process import NgrokProcess

from tray_app.errors import SecretStoreError, TunnelError
from tray_app.secret_store.base import SecretStore
from tray_app.tunnel.agent_process import (
    agent_environment,
    command_line,
    die_with_us,
    wait_gone,
)
from tray_app.tunnel.ngrok_agent import INSTALL_HELP, Agent, find_agent

log = logging.getLogger("lmgate.tunnel.ngrok")

NGROK_AUTHTOKEN = "ngrok-authtoken"
TOKEN_SHAPE = re.compile(r"^[0-9A-Za-z_\-]{20,128}$")
TUNNEL_NAME = "lmgate"
OPEN_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0

# Advice text, not a secret.
TOKEN_HELP = (
    "Copy your authtoken from https://dashboard.ngrok.com/get-started/your-authtoken "  # noqa: S105
    "and run `lmgate tunnel set-token`."
)

# ngrok's error codes -> one sentence with the fix.
_EXPLANATIONS = (
    ("ERR_NGROK_4018", "ngrok needs an account and authtoken. " + TOKEN_HELP),
    ("ERR_NGROK_105", "ngrok says the stored authtoken is malformed. " + TOKEN_HELP),
    ("ERR_NGROK_106", "ngrok says the stored authtoken is from an old version. " + TOKEN_HELP),
    (
        "ERR_NGROK_107",
        "ngrok says the stored authtoken is invalid (reset or revoked). " + TOKEN_HELP,
    ),
    (
        "ERR_NGROK_108",
        "ngrok allows only so many agent sessions at once and that limit is "
        "reached: stop the other ngrok (an old LM Gate or `ngrok` in a terminal) or end it at "
        "https://dashboard.ngrok.com/agents, then try again.",
    ),
    (
        "ERR_NGROK_320",
        "That ngrok domain belongs to another account: use a domain reserved on "
        "your own dashboard (https://dashboard.ngrok.com/domains) or clear tunnel.ngrok_domain.",
    ),
    (
        "ERR_NGROK_7117",
        "That ngrok domain is not reserved: reserve it at "
        "https://dashboard.ngrok.com/domains or clear tunnel.ngrok_domain.",
    ),
    (
        "ERR_NGROK_313",
        "Custom ngrok domains need a reserved domain on your account: reserve one "
        "at https://dashboard.ngrok.com/domains or clear tunnel.ngrok_domain.",
    ),
)


def explain(text: str) -> str:
    for code, sentence in _EXPLANATIONS:
        if code in text:
            return f"{sentence} ({code})"
    return ""


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[authtoken]") if secret else text


def check_token_shape(token: str) -> str:
    token = token.strip()
    if not TOKEN_SHAPE.match(token):
        raise TunnelError(
            "That does not look like an ngrok authtoken (letters, digits and "
            "underscores, 20 or more). " + TOKEN_HELP
        )
    return token


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_spawning = threading.local()


class _ReportingPopen(subprocess.Popen):  # type: ignore[type-arg]
    """pyngrok starts the agent and then waits up to its startup timeout for the agent's first
    lines before returning it; the agent runs all that time, so its PID file must be written
    the moment the process exists, or a second stop signal (which stops the agent by that
    file) would leave it behind. The callback is per thread: only our opening sets one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if getattr(_spawning, "callback", None) is not None:
            if kwargs.get("env") is None:
                # Our agent gets no LMGATE_* variable (LMGATE_SECRET_* may hold secrets).
                kwargs["env"] = agent_environment(os.environ)
            if kwargs.get("preexec_fn") is None:
                kwargs["preexec_fn"] = die_with_us()  # ends with LM Gate, even by SIGKILL
        super().__init__(*args, **kwargs)
        spawned: Callable[[int], None] | None = getattr(_spawning, "callback", None)
        if spawned is not None:
            spawned(self.pid)


class _SubprocessForPyngrok:
    """What pyngrok's process module sees as ``subprocess``: the real one, but its Popen
    reports the PID (see _ReportingPopen)."""

    Popen = _ReportingPopen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


setattr(pyngrok_process, "subprocess", _SubprocessForPyngrok())  # noqa: B010


class NgrokProvider:
    name = "ngrok"
    warning: str | None = None
    # The agent dials the gateway from loopback and appends the internet client's address.
    forwarded_header: str | None = "X-Forwarded-For"

    def __init__(
        self,
        secrets: SecretStore,
        state_dir: Path,
        *,
        ngrok_path: str = "",
        domain: str = "",
        region: str = "",
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self._secrets = secrets
        self._dir = state_dir
        self._ngrok_path = ngrok_path
        self._domain = domain.strip()
        self._region = region.strip()
        self._open_timeout = open_timeout
        self._config: conf.PyngrokConfig | None = None
        self._process: NgrokProcess | None = None
        self._public_url: str | None = None
        self._token: str | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._closing = False

    @property
    def config_path(self) -> Path:
        return self._dir / "ngrok.yml"

    @property
    def pid_path(self) -> Path:
        return self._dir / "agent.pid"

    def set_lost_callback(self, callback: Callable[[str], None]) -> None:
        self._on_lost = callback

    # ---- the public interface --------------------------------------------------------------

    async def open(self, local_port: int) -> str:
        # Proving the agent runs it (`--version`): in a thread, like every blocking call here.
        agent = await asyncio.to_thread(find_agent, self._ngrok_path)
        token = self._load_token()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._open_blocking, agent, token, local_port),
                self._open_timeout,
            )
        except TimeoutError:
            await self.close()
            raise TunnelError(
                f"ngrok did not open a tunnel within {self._open_timeout:g} s; "
                "check your internet connection and try again."
            ) from None

    async def close(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._close_blocking), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("the ngrok agent did not stop within %g s", CLOSE_TIMEOUT)

    async def alive(self) -> bool:
        process = self._process
        return process is not None and process.proc.poll() is None

    @property
    def agent_pid(self) -> int | None:
        process = self._process
        return None if process is None else int(process.proc.pid)

    # ---- blocking work, run in a thread ------------------------------------------------

    def _load_token(self) -> str:
        try:
            token = self._secrets.get(NGROK_AUTHTOKEN)
        except SecretStoreError as exc:
            raise TunnelError(f"The ngrok authtoken could not be read: {exc}") from None
        if not token:
            raise TunnelError("No ngrok authtoken is set. " + TOKEN_HELP)
        return check_token_shape(token)

    def _write_private_config(self, token: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir.chmod(0o700)
        config = {
            "version": "3",
            "agent": {
                "authtoken": token,
                "web_addr": f"127.0.0.1:{_free_loopback_port()}",
                # No inspection database: the inspector would record bodies and bearer tokens.
                "inspect_db_size": -1,
                "update_check": False,
                "log_level": "info",
                "log_format": "logfmt",
            },
        }
        temporary = self.config_path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(config, handle)  # JSON is valid YAML for ngrok and pyngrok alike
        temporary.replace(self.config_path)

    def stop_stale_agent(self) -> bool:
        """Stop an agent of ours left by a crash; True if one was stopped."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return False
        command = command_line(pid)
        if command is None or str(self.config_path) not in command or "ngrok" not in command:
            # Not running, or not ours: leave it alone.
            self.pid_path.unlink(missing_ok=True)
            return False
        log.warning("stopping an ngrok agent left running by an earlier LM Gate (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 5):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)
        self.pid_path.unlink(missing_ok=True)
        return True

    def _open_blocking(self, agent: Agent, token: str, local_port: int) -> str:
        self._closing = False
        self.stop_stale_agent()
        self._write_private_config(token)
        self._token = token
        config = conf.PyngrokConfig(
            ngrok_path=str(agent.path),
            config_path=str(self.config_path),
            region=self._region or None,
            monitor_thread=True,
            log_event_callback=self._on_agent_log,
            startup_timeout=int(self._open_timeout),
            request_timeout=5,
            # Our own stop handling closes the tunnel first; a terminal's Ctrl-C must not
            # kill the agent behind our back.
            start_new_session=True,
        )
        # pyngrok fills auth_token from $NGROK_AUTHTOKEN and would pass it as --authtoken.
        config.auth_token = None
        self._config = config
        options: dict[str, Any] = {"inspect": False}
        if self._domain:
            options["url"] = self._domain if "://" in self._domain else f"https://{self._domain}"
        _spawning.callback = self._write_pid
        try:
            process = self._process = ngrok.get_ngrok_process(config)
            # Again: pyngrok may have handed back an agent it had started before.
            self._write_pid(process.proc.pid)
            threading.Thread(
                target=self._watch_exit, args=(process,), daemon=True, name="ngrok-agent-watch"
            ).start()
            tunnel = ngrok.connect(
                f"http://127.0.0.1:{local_port}", pyngrok_config=config, name=TUNNEL_NAME, **options
            )
        except PyngrokError as exc:
            self._close_blocking()
            raise TunnelError(self._describe(exc)) from None
        finally:
            _spawning.callback = None
        if not tunnel.public_url:
            self._close_blocking()
            raise TunnelError("ngrok opened a tunnel but reported no public URL.")
        self._public_url = tunnel.public_url
        return tunnel.public_url

    def _write_pid(self, pid: int) -> None:
        self.pid_path.write_text(f"{pid} {self.config_path}\n")

    def _describe(self, exc: PyngrokError) -> str:
        detail = " ".join(
            str(part)
            for part in (exc, getattr(exc, "ngrok_error", ""), getattr(exc, "body", ""))
            if part
        )
        explained = explain(detail)
        if explained:
            return explained
        if "not found" in detail.lower() and "binary" in detail.lower():
            return "The ngrok agent is not installed. " + INSTALL_HELP
        short = redact(detail, self._token).strip().splitlines()[0][:200]
        return f"ngrok could not open a tunnel: {short}"

    def _on_agent_log(self, entry: NgrokLog) -> None:
        """Runs on pyngrok's monitor thread for every agent log line."""
        if self._closing:
            return
        text = f"{entry.msg or ''} {entry.err or ''}"
        if (
            entry.lvl in {"ERROR", "CRITICAL"}
            or "session closed" in text
            or "failed to reconnect" in text
        ):
            reason = explain(text) or redact(text, self._token).strip()[:200]
            log.warning("ngrok agent: %s", reason)
            if self._on_lost is not None:
                self._on_lost(reason)

    def _watch_exit(self, process: NgrokProcess) -> None:
        """Runs on its own thread: an agent that exits while we did not ask is a lost tunnel."""
        process.proc.wait()
        if not self._closing and self._process is process and self._on_lost is not None:
            self._on_lost(f"the ngrok agent exited (code {process.proc.returncode})")

    def _close_blocking(self) -> None:
        self._closing = True
        config, self._config = self._config, None
        process, self._process = self._process, None
        if config is None:
            return
        pid = None if process is None else process.proc.pid
        if self._public_url and process is not None and process.proc.poll() is None:
            with contextlib.suppress(PyngrokError, OSError):
                ngrok.disconnect(self._public_url, pyngrok_config=config)
        self._public_url = None
        with contextlib.suppress(PyngrokError, OSError):
            ngrok.kill(config)
        if pid is not None and not wait_gone(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
        if process is not None:
            _close_pipes(process)
        self.pid_path.unlink(missing_ok=True)
        # The token's only copy outside the keyring goes with the agent.
        self.config_path.unlink(missing_ok=True)


def _close_pipes(process: NgrokProcess) -> None:
    """pyngrok never closes the agent's output pipe: each agent that died and was replaced
    left one descriptor open (a soak that killed the agent found it). The agent is gone by
    now, so pyngrok's reader has met the pipe's end and nothing reads it any more."""
    proc = process.proc
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def silence_pyngrok_logs() -> None:
    """pyngrok logs every agent line, and the agent's own errors may contain the authtoken."""
    for name in ("pyngrok", "pyngrok.process", "pyngrok.process.ngrok"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = False
        logger.setLevel(logging.CRITICAL + 1)
