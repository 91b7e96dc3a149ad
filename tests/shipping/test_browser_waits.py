"""Every ``wait_for_function`` in the browser tests hands Playwright a function, not an expression.

Playwright evaluates a bare expression string by ``eval`` inside the page while it polls, and the
phone page's Content Security Policy (``script-src 'self'``, no ``'unsafe-eval'``) refuses that —
but only once the first check has come out false, so such a wait passes on a fast machine and
fails on a slow one. A string that starts with an arrow function is passed as a function and
never needs ``eval``. The rule is checked on the syntax tree of every test file.
"""

from __future__ import annotations

import ast

from tests.helpers import REPO_ROOT


def _expression_waits(source: str) -> list[int]:
    """The lines of ``source`` whose wait_for_function is handed an expression."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "wait_for_function"
            and node.args
        ):
            continue
        first = node.args[0]
        if isinstance(first, ast.JoinedStr) and first.values:
            first = first.values[0]
        if isinstance(first, ast.BinOp) and isinstance(first.left, ast.Constant):
            first = first.left
        if (
            isinstance(first, ast.Constant)
            and isinstance(first.value, str)
            and not first.value.lstrip().startswith(("() =>", "(", "function"))
        ):
            found.append(node.lineno)
    return found


def test_browser_waits_pass_functions_not_expressions() -> None:
    files = sorted((REPO_ROOT / "tests").rglob("*.py"))
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line}"
        for path in files
        for line in _expression_waits(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_check_finds_an_expression_wait() -> None:
    expression = "page.wait_for_function(\"document.title === 'x'\")\n"
    arrow = "page.wait_for_function(\"() => document.title === 'x'\")\n"
    assert _expression_waits("x = 1\n" + expression) == [2]
    assert _expression_waits(arrow) == []
