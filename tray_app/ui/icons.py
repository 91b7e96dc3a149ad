"""Tray icons by state, from resources/icons (SVG); template (mask) variants for macOS."""

from __future__ import annotations

import sys

from PySide6.QtGui import QIcon

from tray_app.control.controller import Phase
from tray_app.paths import resource_path


def icon_for(phase: str, *, template: bool | None = None) -> QIcon:
    """The icon of ``phase`` (a :class:`Phase` value names its icon); an unknown phase shows
    the error icon."""
    if phase not in set(Phase):
        phase = Phase.ERROR
    use_template = sys.platform == "darwin" if template is None else template
    name = f"{phase}-template.svg" if use_template else f"{phase}.svg"
    icon = QIcon(str(resource_path("icons", name)))
    if use_template:
        icon.setIsMask(True)  # macOS tints it for light and dark menu bars
    return icon
