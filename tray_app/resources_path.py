"""Where the shipped resources (icons, the phone page) are: inside the installed package, or
at the top of the repository when running from a checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_path(*parts: str) -> Path:
    try:
        base = Path(str(resources.files("tray_app.resources")))
        if (base / parts[0]).exists():
            return base.joinpath(*parts)
    except (ModuleNotFoundError, TypeError):
        pass
    here = Path(__file__).resolve().parent
    frozen = here / "resources"  # the PyInstaller build puts them beside the package's modules
    if (frozen / parts[0]).exists():
        return frozen.joinpath(*parts)
    return here.parent.joinpath("resources", *parts)
