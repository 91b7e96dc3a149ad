"""Tray icons by state, from resources/icons (SVG); template (mask) variants for macOS."""

from __future__ import annotations

import sys

from PySide6.QtGui import QIcon

from tray_app.paths import resource_path

PHASES = ("private", "starting", "public", "reconnecting", "error")


def icon_for(phase: str, *, template: bool | None = None) -> QIcon:
    if phase not in PHASES:
        phase = "error"
    use_template = sys.platform == "darwin" if template is None else template
    name = f"{phase}-template.svg" if use_template else f"{phase}.svg"
    icon = QIcon(str(resource_path("icons", name)))
    if use_template:
        icon.setIsMask(True)  # macOS tints it for light and dark menu bars
    return icon
