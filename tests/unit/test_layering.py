"""The core never imports Qt: a headless server must not need PySide6."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "tray_app"
CORE_MODULES = sorted(
    "tray_app." + str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".")
    for p in PACKAGE.rglob("*.py")
    if "ui" not in p.relative_to(PACKAGE).parts and p.name not in {"__main__.py"}
)


def test_core_modules_import_without_qt() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE_MODULES)
        + "qt = {'PySide6', 'PyQt5', 'PyQt6', 'shiboken6'}\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in qt)\n"
        + "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(CORE_MODULES) >= 10


def test_no_core_source_mentions_a_qt_import() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "ui" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in {"PySide6", "shiboken6"} for n in names), path
