"""Paths: where the shipped resources (icons, the phone page) are — inside the installed
package, or at the top of the repository when running from a checkout — and private
directories for what LM Gate keeps on disk."""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

import platformdirs

APP_NAME = "lmgate"


def _resource_roots() -> tuple[Path, ...]:
    """Where the resources may be, in order: the installed package's, the PyInstaller
    build's (beside the package's modules), the checkout's (the last, the fallback)."""
    roots: list[Path] = []
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        roots.append(Path(str(resources.files("tray_app.resources"))))
    here = Path(__file__).resolve().parent
    return (*roots, here / "resources", here.parent / "resources")


# Looked up once, when this module is imported. Asked on every call, a checkout's missing
# tray_app.resources package ran the whole import machinery each time, and the tray's icons
# (Qt thread) and the phone page (loop thread) doing so at once hung a test run in
# importlib's locks.
_ROOTS = _resource_roots()


def resource_path(*parts: str) -> Path:
    for root in _ROOTS[:-1]:
        if (root / parts[0]).exists():
            return root.joinpath(*parts)
    return _ROOTS[-1].joinpath(*parts)


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` and any missing parents 0700 each (``mkdir(parents=True)`` gives
    the parents the umask's 0755), and tighten ``directory`` itself if it already existed."""
    missing: list[Path] = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it just now
            made.mkdir(mode=0o700)
        made.chmod(0o700)  # the umask may have taken bits mkdir was given
    directory.chmod(0o700)


def user_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def user_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def user_log_dir() -> Path:
    """Where the tray app writes its log file (``lmgate doctor`` points users at it)."""
    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))
