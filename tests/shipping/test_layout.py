"""The README's layout section is the package tree: every package and module is in it, and
nothing that does not exist. A module added, moved or deleted without the README fails here."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "tray_app"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.py|/)")


def layout_block() -> str:
    section = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("\n## Layout", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```text\n(.+?)\n```", section, re.S)
    assert len(blocks) == 1, "the layout section holds one ```text tree"
    return str(blocks[0])


def documented_tree(block: str) -> tuple[set[str], set[str]]:
    """Packages and modules the tree names, as paths under ``tray_app/``.

    A line's depth is the column of its first name over four (the tree's indent); a folder
    (``name/``) opens that depth, and modules on a line belong to the folder one level up.
    Only names before the description (two or more spaces) count.
    """
    packages: set[str] = set()
    modules: set[str] = set()
    stack: list[str] = []
    for line in block.splitlines():
        match = re.search(r"[A-Za-z_]", line)
        if match is None:
            continue
        depth = match.start() // 4
        names_part = re.split(r"\S\s{2,}", line[match.start() :] + "  ", maxsplit=1)
        head = line[match.start() : match.start() + len(names_part[0]) + 1]
        for token in _NAME.findall(head):
            if token.endswith("/"):
                del stack[depth:]
                stack.append(token[:-1])
                packages.add("/".join(stack))
            else:
                folder = "/".join(stack[:depth])
                modules.add(f"{folder}/{token}")
    return packages, modules


def actual_tree() -> tuple[set[str], set[str]]:
    packages = {"tray_app"}
    modules: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        relative = Path("tray_app") / path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            packages.add(str(relative.parent))
        else:
            modules.add(str(relative))
    return packages, modules


def test_readme_layout_is_the_package_tree() -> None:
    packages, modules = documented_tree(layout_block())
    real_packages, real_modules = actual_tree()
    assert sorted(real_packages - packages) == [], "packages missing from the README's tree"
    assert sorted(packages - real_packages) == [], (
        "the README's tree names packages that do not exist"
    )
    assert sorted(real_modules - modules) == [], "modules missing from the README's tree"
    assert sorted(modules - real_modules) == [], "the README's tree names modules that do not exist"


def test_the_tree_reader_follows_depth_and_ignores_descriptions() -> None:
    block = "\n".join(
        [
            "tray_app/                  the package; see errors.py for the tree",
            "├── main.py                entry point",
            "├── gateway/               proxy",
            "│   ├── app.py routes.py   the app and its routes.py table",
            "│   └── server/",
            "│       └── runner.py",
            "└── ui/",
            "    └── tray.py",
        ]
    )
    packages, modules = documented_tree(block)
    assert packages == {"tray_app", "tray_app/gateway", "tray_app/gateway/server", "tray_app/ui"}
    assert modules == {
        "tray_app/main.py",
        "tray_app/gateway/app.py",
        "tray_app/gateway/routes.py",
        "tray_app/gateway/server/runner.py",
        "tray_app/ui/tray.py",
    }
