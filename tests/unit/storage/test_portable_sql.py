"""The stores' SQL is written once for SQLite and PostgreSQL: a PostgreSQL backend turns each
``?`` placeholder into ``%s``, which is only right if no ``?`` ever sits inside a quoted literal,
and SQLite's dialect-only forms must not creep back in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# Every module whose SQL reaches the stores' connections: storage's alone (checked below).
SQL_MODULES = sorted((ROOT / "tray_app" / "storage").glob("*.py"))
_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE)\b")
# SQLite-only spellings: the migrations of old SQLite files may use them, the stores may not.
_SQLITE_ONLY = re.compile(
    r"INSERT OR IGNORE|INSERT OR REPLACE|WITHOUT ROWID|\b(MAX|MIN)\((?:[^()]|\([^()]*\))*,"
)
# "": module level, i.e. the SQLite schema (PostgreSQL gets its own DDL).
SQLITE_ONLY_FUNCTIONS = {"", "_migrate", "_split_shared_principals", "_add_column", "__init__"}


def _strings(tree: ast.AST) -> list[tuple[str, str]]:
    """(enclosing function, text) of every string constant and f-string's literal parts."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "x"
                for v in node.values
            )
            found.append((function, text))
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((function, node.value))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def _question_marks_in_literals(sql: str) -> list[int]:
    quoted, found = False, []
    for index, char in enumerate(sql):
        if char == "'":
            quoted = not quoted
        elif char == "?" and quoted:
            found.append(index)
    return found


def _statements() -> list[tuple[str, str, str]]:
    statements = []
    for path in SQL_MODULES:
        for function, text in _strings(ast.parse(path.read_text())):
            if _SQL.search(text) and not text.lstrip().startswith(('"""', "The ", "A ")):
                statements.append((path.name, function, text))
    return statements


def test_the_scan_finds_the_stores_sql() -> None:
    texts = [text for _, _, text in _statements()]
    assert any("ON CONFLICT(principal) DO UPDATE" in t for t in texts)
    assert any("pairing_codes" in t and "used IS NULL" in t for t in texts)
    assert len(texts) > 40


@pytest.mark.parametrize(("module", "function", "sql"), _statements())
def test_no_placeholder_inside_a_literal(module: str, function: str, sql: str) -> None:
    assert _question_marks_in_literals(sql) == [], f"{module}:{function}: {sql}"


@pytest.mark.parametrize(("module", "function", "sql"), _statements())
def test_no_sqlite_only_spelling_outside_the_sqlite_set_up(
    module: str, function: str, sql: str
) -> None:
    if module == "database.py" and function in SQLITE_ONLY_FUNCTIONS:
        return
    assert not _SQLITE_ONLY.search(sql), f"{module}:{function}: {sql}"


def test_the_spelling_check_sees_a_two_argument_max() -> None:
    assert _SQLITE_ONLY.search("last_seen = MAX(COALESCE(last_seen, 0), excluded.last_seen)")
    assert not _SQLITE_ONLY.search("SELECT MAX(COALESCE(last_seen, 0)) FROM usage")


def test_the_literal_scan_sees_a_question_mark_in_quotes() -> None:
    assert _question_marks_in_literals("SELECT '?' WHERE a = ?") == [8]
    assert _question_marks_in_literals("SELECT 'it''s' WHERE a = ?") == []


_STATEMENT = re.compile(
    r"[\"'](SELECT |INSERT INTO |UPDATE \w+ SET |DELETE FROM |CREATE (TABLE|INDEX) )"
)


def test_no_sql_is_written_outside_storage() -> None:
    # One place knows both dialects; a statement elsewhere would be checked by nobody.
    outside = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "tray_app").rglob("*.py"))
        if "storage" not in path.relative_to(ROOT / "tray_app").parts[:1]
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _STATEMENT.search(line)
    ]
    assert outside == []


def test_the_check_finds_a_statement() -> None:
    assert _STATEMENT.search('conn.execute("SELECT value FROM meta")')
    assert _STATEMENT.search("'UPDATE meta SET value = 1'")
    assert not _STATEMENT.search('"Select a model"')
