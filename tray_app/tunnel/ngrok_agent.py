"""Finding the ngrok agent, and never running something that only looks like one.

pyngrok installs a console script named ``ngrok`` (``from pyngrok.ngrok import main``) that
downloads the agent when it runs; inside a virtualenv it is often the first ``ngrok`` on PATH.
It is recognised by reading it, never by running it. Any other candidate counts only when
``--version`` exits 0 within a few seconds and prints ``ngrok version 3.x``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pyngrok import conf

from tray_app.errors import TunnelError

VERSION_TIMEOUT = 5.0
# Enough for any script header; a real agent is a large compiled binary.
_SCRIPT_HEAD = 64 * 1024
_RUNS_PYNGROK = re.compile(rb"\bfrom\s+pyngrok\b|\bimport\s+pyngrok\b|-m\s+pyngrok\b")
_VERSION = re.compile(r"ngrok version ((\d+)\.\d+(?:\.\d+)*(?:[-+][\w.]+)?)")
_MIN_MAJOR = 3  # the agent API (/api/endpoints) and config format pyngrok drives

INSTALL_HELP = (
    "Install the ngrok agent from https://ngrok.com/download (or `brew install ngrok`, "
    "`snap install ngrok`, `choco install ngrok`), then put it on your PATH or set "
    "tunnel.ngrok_path to the binary."
)
SHIM = "pyngrok's `ngrok` command, which downloads ngrok when run"


@dataclass(frozen=True, slots=True)
class Agent:
    path: Path
    version: str  # e.g. "3.19.1"


def is_pyngrok_shim(path: Path) -> bool:
    """Whether ``path`` is pyngrok's console script (or its Windows launcher). Reads only."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SCRIPT_HEAD)
    except OSError:
        return False
    if b"\0" not in head:  # a text script
        return _RUNS_PYNGROK.search(head) is not None
    return _launcher_runs_pyngrok(path)


def _launcher_runs_pyngrok(path: Path) -> bool:
    # pip's Windows launchers are an .exe with a zip appended; its __main__.py is the script.
    try:
        with zipfile.ZipFile(path) as archive:
            script = archive.read("__main__.py")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, RuntimeError, ValueError, zlib.error):
        # RuntimeError covers NotImplementedError: an archive we cannot read is not the shim.
        return False
    return _RUNS_PYNGROK.search(script) is not None


def _no_downloads_environment() -> dict[str, str]:
    # A real agent's --version needs no network. A downloader that slipped past the shim check
    # (pyngrok's script behind a wrapper such as a pyenv shim) finds every HTTP(S) request sent
    # to a closed port: it fails at once, having fetched nothing, and so does not count.
    closed = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    env.update(
        {name: closed for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    )
    env.update({"ALL_PROXY": closed, "all_proxy": closed})
    return env


_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def _version_output(path: Path, timeout: float) -> tuple[int, str] | str:
    """(exit status, stdout) of ``path --version``, or why it could not be had."""
    try:
        # The path is the configured agent or an ngrok on PATH, run without a shell.
        proc = subprocess.Popen(  # noqa: S603
            [str(path), "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_no_downloads_environment(),
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
            _kill_group(proc)
            proc.communicate()
            return f"`{path} --version` did not answer within {timeout:g} s"
    return proc.returncode, out.decode(errors="replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if sys.platform == "win32":
        proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def probe(path: Path) -> Agent | str:
    """The agent at ``path``, or (as a phrase) why it is not one."""
    if is_pyngrok_shim(path):
        return f"{path} is {SHIM}"
    result = _version_output(path, VERSION_TIMEOUT)
    if isinstance(result, str):
        return result
    status, out = result
    if status != 0:
        return f"`{path} --version` failed (exit status {status})"
    first = out.strip().splitlines()[0] if out.strip() else ""
    match = _VERSION.fullmatch(first.strip())
    if match is None:
        return f"`{path} --version` did not print an ngrok version"
    version, major = match.group(1), int(match.group(2))
    if major < _MIN_MAJOR:
        return f"{path} is ngrok {version}, and LM Gate needs version {_MIN_MAJOR} or newer"
    return Agent(path, version)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def candidates() -> list[Path]:
    """Every ``ngrok`` on PATH in order, then the copy pyngrok may have downloaded earlier."""
    names = ["ngrok"]
    if sys.platform == "win32":
        extensions = os.environ.get("PATHEXT", ".EXE;.BAT;.CMD").split(os.pathsep)
        names = [f"ngrok{ext.lower()}" for ext in extensions if ext]
    found: list[Path] = []
    seen: set[Path] = set()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory:
            continue  # an empty entry means the current directory: never look there
        for name in names:
            path = Path(directory) / name
            if _executable(path) and path.resolve() not in seen:
                seen.add(path.resolve())
                found.append(path)
    default = Path(conf.DEFAULT_NGROK_PATH)
    if _executable(default) and default.resolve() not in seen:
        found.append(default)
    return found


def find_agent(configured: str = "") -> Agent:
    """The ngrok agent to use; TunnelError saying how to get one if there is none."""
    if configured:
        return _configured_agent(Path(configured).expanduser())
    reasons: list[str] = []
    for path in candidates():
        found = probe(path)
        if isinstance(found, Agent):
            return found
        reasons.append(found)
    if reasons:
        raise TunnelError(
            f"No usable ngrok agent was found ({'; '.join(reasons)}), and LM Gate does not "
            "download programs by itself. " + INSTALL_HELP
        )
    raise TunnelError(
        "The ngrok agent is not installed, and LM Gate does not download "
        "programs by itself. " + INSTALL_HELP
    )


def _configured_agent(path: Path) -> Agent:
    if not _executable(path):
        raise TunnelError(
            f"tunnel.ngrok_path points to {path}, which is not an executable "
            "ngrok binary. " + INSTALL_HELP
        )
    if is_pyngrok_shim(path):
        raise TunnelError(
            f"tunnel.ngrok_path points to {path}, which is {SHIM}, not the ngrok agent: "
            "install the agent from https://ngrok.com/download and set tunnel.ngrok_path "
            "to it (or clear the setting to use the one on your PATH)."
        )
    found = probe(path)
    if isinstance(found, str):
        raise TunnelError(
            f"tunnel.ngrok_path points to {path}, which is not the ngrok agent: {found}. "
            + INSTALL_HELP
        )
    return found
