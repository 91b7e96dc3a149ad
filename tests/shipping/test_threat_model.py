"""The threat model names real tests: every ``file::Class::test`` in docs/security.md exists, so
a test renamed or moved cannot leave a threat defended by a name that no longer runs."""

from __future__ import annotations

import re

from tests.helpers import REPO_ROOT

SECURITY = (REPO_ROOT / "docs" / "security.md").read_text(encoding="utf-8")
# `path/test_x.py::Name` or `::Name` (the file of the reference before), `::Name::test` too;
# paths are under tests/, with or without that prefix.
_REFERENCE = re.compile(
    r"`(?:tests/)?((?:[a-z_]+/)*test_[a-z_]+\.py)?(?:::([A-Za-z_]\w*)(?:::([A-Za-z_]\w*))?)?`"
)


def references() -> list[tuple[str, str | None, str | None]]:
    found: list[tuple[str, str | None, str | None]] = []
    current: str | None = None
    for match in _REFERENCE.finditer(SECURITY):
        path, name, inner = match.groups()
        if path is None and name is None:
            continue
        current = path or current
        assert current is not None, f"{match.group(0)} names no file before it"
        found.append((current, name, inner))
    return found


def test_every_test_the_threat_model_names_exists() -> None:
    refs = references()
    assert len(refs) >= 60
    for path, name, inner in refs:
        source = REPO_ROOT / "tests" / path
        assert source.is_file(), f"docs/security.md names tests/{path}, which does not exist"
        text = source.read_text(encoding="utf-8")
        if name is not None:
            assert re.search(rf"^\s*(?:async def|def|class) {name}\b", text, re.M), (path, name)
        if inner is not None:
            assert re.search(rf"^\s+(?:async def|def) {inner}\b", text, re.M), (path, inner)
