"""Finding the ngrok agent, and never running something that only looks like one.

pyngrok installs a console script named ``ngrok`` (``from pyngrok.ngrok import main``) that
downloads the agent when it runs; inside a virtualenv it is often the first ``ngrok`` on PATH.
It is recognised by reading it, never by running it. Any other candidate counts only when
``--version`` exits 0 within a few seconds and prints ``ngrok version 3.x``.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pyngrok import conf

from tray_app.errors import TunnelError
from tray_app.tunnel.agent_binary import VERSION_TIMEOUT, executable, on_path, version_output

# Enough for any script header; a real agent is a large compiled binary.
_SCRIPT_HEAD = 64 * 1024
_RUNS_PYNGROK = re.compile(rb"\bfrom\s+pyngrok\b|\bimport\s+pyngrok\b|-m\s+pyngrok\b")
_VERSION = re.compile(r"ngrok version ((\d+)\.\d+(?:\.\d+)*(?:[-+][\w.]+)?)")
_MIN_MAJOR = 3  # the agent API (/api/endpoints) and config format pyngrok drives

INSTALL_HELP = (
    "Install the ngrok agent from https://ngrok.com/download (or `brew install ngrok`, "
    "`snap install ngrok`, `choco install ngrok`, or `lmgate tunnel install-agent`, which asks "
    "first), then put it on your PATH or set tunnel.ngrok_path to the binary."
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


def probe(path: Path) -> Agent | str:
    """The agent at ``path``, or (as a phrase) why it is not one."""
    if is_pyngrok_shim(path):
        return f"{path} is {SHIM}"
    result = version_output(path, timeout=VERSION_TIMEOUT)
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


def candidates() -> list[Path]:
    """Every ``ngrok`` on PATH in order, then the copy pyngrok may have downloaded earlier."""
    found = on_path("ngrok")
    seen = {path.resolve() for path in found}
    default = Path(conf.DEFAULT_NGROK_PATH)
    if executable(default) and default.resolve() not in seen:
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
    if not executable(path):
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
