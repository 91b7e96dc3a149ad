"""Finding a tunnel agent's program (cloudflared, tailscale, ngrok), never one that downloads.

An agent counts only when it is the configured path or on PATH, and when its version command
exits 0 within a few seconds and prints a version LM Gate knows how to drive. It runs with
every proxy variable pointing at a closed port, so a program that tries to download something
when asked its version fails at once, having fetched nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tray_app.errors import TunnelError

VERSION_TIMEOUT = 5.0
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


@dataclass(frozen=True, slots=True)
class Agent:
    path: Path
    version: str  # e.g. "3.19.1"


@dataclass(frozen=True, slots=True)
class AgentKind:
    """What LM Gate knows about one agent program."""

    program: str  # the name on PATH: "cloudflared"
    setting: str  # where its path is configured: "tunnel.cloudflared_path"
    version_args: tuple[str, ...]
    version: re.Pattern[str]  # searched in the version output; group 1 is the version
    minimum: tuple[int, ...]
    install_help: str  # one sentence: where to get it

    @property
    def minimum_text(self) -> str:
        return ".".join(str(part) for part in self.minimum)


def no_downloads_environment() -> dict[str, str]:
    closed = "http://127.0.0.1:9"
    # Nor LM Gate's own variables (LMGATE_SECRET_* may hold secrets): a version needs none.
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_VARIABLES and not k.upper().startswith("LMGATE_")
    }
    env.update(
        {name: closed for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    )
    env.update({"ALL_PROXY": closed, "all_proxy": closed})
    return env


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    if sys.platform == "win32":
        proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def version_output(
    path: Path, args: Sequence[str] = ("--version",), timeout: float = VERSION_TIMEOUT
) -> tuple[int, str] | str:
    """(exit status, stdout) of ``path args``, or why it could not be had."""
    try:
        # The path is the configured agent or one on PATH, run without a shell.
        proc = subprocess.Popen(  # noqa: S603
            [str(path), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=no_downloads_environment(),
            # Its own process group: a timeout kills a wrapper's children too, which would
            # otherwise hold the pipe open and hang the wait.
            start_new_session=sys.platform != "win32",
        )
    except OSError as exc:
        return f"{path} does not run ({exc.strerror or exc})"
    with proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.communicate()
            return f"`{path} {' '.join(args)}` did not answer within {timeout:g} s"
    return proc.returncode, out.decode(errors="replace")


def executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def on_path(program: str) -> list[Path]:
    """Every ``program`` on PATH, in order, each real file once."""
    names = [program]
    if sys.platform == "win32":
        extensions = os.environ.get("PATHEXT", ".EXE;.BAT;.CMD").split(os.pathsep)
        names = [f"{program}{ext.lower()}" for ext in extensions if ext]
    found: list[Path] = []
    seen: set[Path] = set()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not Path(directory).is_absolute():
            # An empty entry means the current directory, and a relative one ("." or "bin")
            # a place under it, which Popen would look up again on its own: never look there.
            continue
        for name in names:
            path = Path(directory) / name
            if executable(path) and path.resolve() not in seen:
                seen.add(path.resolve())
                found.append(path)
    return found


def _numbers(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in re.split(r"[.\-+]", version):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def probe(kind: AgentKind, path: Path) -> Agent | str:
    """The agent at ``path``, or (as a phrase) why it is not one LM Gate can use."""
    result = version_output(path, kind.version_args)
    if isinstance(result, str):
        return result
    status, out = result
    command = f"`{path} {' '.join(kind.version_args)}`"
    if status != 0:
        return f"{command} failed (exit status {status})"
    match = kind.version.search(out)
    if match is None:
        return f"{command} did not print a {kind.program} version"
    version = match.group(1)
    if _numbers(version) < kind.minimum:
        return (
            f"{path} is {kind.program} {version}, and LM Gate needs version "
            f"{kind.minimum_text} or newer"
        )
    return Agent(path, version)


def find_agent(kind: AgentKind, configured: str = "") -> Agent:
    """The agent to use; TunnelError saying how to get one if there is none."""
    if configured:
        path = Path(configured).expanduser()
        if not executable(path):
            raise TunnelError(
                f"{kind.setting} points to {path}, which is not an executable "
                f"{kind.program} program. {kind.install_help}"
            )
        found = probe(kind, path)
        if isinstance(found, str):
            raise TunnelError(f"{kind.setting} points to {path}: {found}. {kind.install_help}")
        return found
    reasons: list[str] = []
    for path in on_path(kind.program):
        found = probe(kind, path)
        if isinstance(found, Agent):
            return found
        reasons.append(found)
    if reasons:
        raise TunnelError(
            f"No usable {kind.program} was found ({'; '.join(reasons)}), and LM Gate does "
            f"not download programs by itself. {kind.install_help}"
        )
    raise TunnelError(
        f"{kind.program} is not installed, and LM Gate does not download programs by "
        f"itself. {kind.install_help}"
    )
