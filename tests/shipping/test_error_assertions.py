"""A test that expects an error status also pins which error it was (issue 13, point 4).

A client tells LM Gate's refusals apart by ``error.code`` (and ``error.param`` for a bad body
field), not by the status: 401 alone is ``invalid_api_key``, ``token_expired``, ``token_revoked``
and a dozen more. A test that asserts only ``status == 401`` still passes when the gate refuses
for the wrong reason, so every test function that compares a status to a 4xx/5xx number must
also read the error's ``code`` (or compare the whole ``error`` object, or hand the answer to a
helper such as ``assert_api_error`` or ``error_of``). The rule is checked on the syntax tree of
every test file.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO_ROOT

# Tests that compare a status to an error number without expecting one particular error.
NOT_ONE_ERROR = {
    # A fuzz test: any path may be refused in any way, as long as it never reaches LM Studio.
    "test_generated_paths_only_ever_reach_allowed_endpoints",
    # The fake LM Studio's own tests: its 404s are LM Studio's, not LM Gate's catalogue.
    "test_a_server_without_the_native_api_answers_404",
    "test_an_unknown_model_is_refused_like_lm_studio",
}


def _names_a_status(node: ast.expr) -> bool:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        if isinstance(node, ast.Attribute) and "status" in node.attr:
            return True
        node = node.func if isinstance(node, ast.Call) else node.value
    return isinstance(node, ast.Name) and "status" in node.id


def _is_error_status(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and 400 <= node.value <= 599


def _expects_error_status(function: ast.AST) -> int | None:
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Compare)
            and _names_a_status(node.left)
            and any(_is_error_status(c) for c in node.comparators)
        ):
            return node.lineno
    return None


def _reads_the_error(function: ast.AST) -> bool:
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and node.slice.value in ("code", "error")
        ):
            return True
        if isinstance(node, ast.Attribute) and node.attr in ("code", "error"):
            return True
        if isinstance(node, ast.Call):
            name = str(getattr(node.func, "id", None) or getattr(node.func, "attr", ""))
            if "error" in name:  # assert_api_error(...), error_of(body), expect_error(...)
                return True
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes | str):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            if '"code"' in text:  # raw socket answers are matched as bytes
                return True
    return False


def _test_functions() -> list[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                "test"
            ):
                found.append((path, node))
    return found


def test_every_expected_error_status_comes_with_its_code() -> None:
    unpinned = []
    for path, function in _test_functions():
        line = _expects_error_status(function)
        if line is None or function.name in NOT_ONE_ERROR or _reads_the_error(function):
            continue
        unpinned.append(f"{path.relative_to(REPO_ROOT)}:{line} {function.name}")
    assert unpinned == []


def test_the_rule_sees_a_bare_status_and_accepts_a_pinned_one() -> None:
    bare = ast.parse("async def test_x(r):\n    assert r.status == 401\n").body[0]
    pinned = ast.parse(
        'async def test_x(r, body):\n    assert (r.status, body["error"]["code"]) == (401, "x")\n'
        "    assert r.status == 401\n"
    ).body[0]
    success = ast.parse("def test_x(r):\n    assert r.status == 200\n").body[0]
    assert _expects_error_status(bare) == 2 and not _reads_the_error(bare)
    assert _expects_error_status(pinned) == 3 and _reads_the_error(pinned)
    assert _expects_error_status(success) is None


def test_every_exemption_names_a_test_that_exists() -> None:
    names = {function.name for _, function in _test_functions()}
    assert names >= NOT_ONE_ERROR
