"""Start at login: an autostart entry on Linux, a LaunchAgent on macOS, the Run key on Windows.

The location is passed in (tests use a temporary directory); ``command`` is what to run.
"""

from __future__ import annotations

import importlib
import plistlib
import shlex
import sys
from pathlib import Path
from typing import Any

LABEL = "app.lmgate.tray"


class Autostart:
    def __init__(
        self, command: list[str], *, platform: str | None = None, home: Path | None = None
    ) -> None:
        self._command = command
        self._platform = platform or sys.platform
        self._home = home or Path.home()

    @property
    def path(self) -> Path | None:
        if self._platform.startswith("linux"):
            return self._home / ".config" / "autostart" / "lmgate.desktop"
        if self._platform == "darwin":
            return self._home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        return None  # Windows: the registry

    def is_enabled(self) -> bool:
        path = self.path
        if path is not None:
            return path.exists()
        return self._windows_value() is not None

    def enable(self) -> None:
        path = self.path
        if path is None:
            self._windows_set(subprocess_line(self._command))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".desktop":
            path.write_text(
                "[Desktop Entry]\nType=Application\nName=LM Gate\n"
                "Comment=Share your LM Studio safely\n"
                f"Exec={shlex.join(self._command)}\nX-GNOME-Autostart-enabled=true\n"
                "Terminal=false\n",
                encoding="utf-8",
            )
        else:
            path.write_bytes(
                plistlib.dumps(
                    {
                        "Label": LABEL,
                        "ProgramArguments": self._command,
                        "RunAtLoad": True,
                        "ProcessType": "Interactive",
                    }
                )
            )

    def disable(self) -> None:
        path = self.path
        if path is not None:
            path.unlink(missing_ok=True)
        else:
            self._windows_delete()

    # The Run key, only on Windows.
    def _windows_value(self) -> str | None:  # pragma: no cover - Windows only
        winreg: Any = importlib.import_module("winreg")

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, _RUN_KEY) as key:
                return str(winreg.QueryValueEx(key, "LM Gate")[0])
        except OSError:
            return None

    def _windows_set(self, line: str) -> None:  # pragma: no cover - Windows only
        winreg: Any = importlib.import_module("winreg")

        with winreg.CreateKey(winreg.HKEY_CURRENT_USER, _RUN_KEY) as key:
            winreg.SetValueEx(key, "LM Gate", 0, winreg.REG_SZ, line)

    def _windows_delete(self) -> None:  # pragma: no cover - Windows only
        winreg: Any = importlib.import_module("winreg")

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, _RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
                winreg.DeleteValue(key, "LM Gate")
        except OSError:
            pass


_RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


def subprocess_line(command: list[str]) -> str:
    import subprocess

    return subprocess.list2cmdline(command)


def default_command() -> list[str]:
    return [sys.executable, "-m", "tray_app"]
