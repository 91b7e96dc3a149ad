"""The coverage guard fails on any guarded line no test ran, and on a guarded module never run."""

from __future__ import annotations

from pathlib import Path

import coverage

from tests.coverage_guard import GUARDED, REPO_ROOT, missing_lines


def record(data_file: Path, lines: dict[str, set[int]]) -> None:
    data = coverage.CoverageData(basename=str(data_file))
    data.add_lines({str(REPO_ROOT / name): ran for name, ran in lines.items()})
    data.write()


def statements(relative: str) -> set[int]:
    cov = coverage.Coverage(data_file=None)
    return set(cov.analysis2(str(REPO_ROOT / relative))[1])


def test_every_line_run_passes_and_one_line_not_run_fails(tmp_path: Path) -> None:
    every = {name: statements(name) for name in GUARDED}
    record(tmp_path / "all", every)
    assert missing_lines(tmp_path / "all") == {}

    first, *_ = GUARDED
    skipped = max(every[first])
    record(tmp_path / "one-short", {**every, first: every[first] - {skipped}})
    assert missing_lines(tmp_path / "one-short") == {first: [skipped]}


def test_a_guarded_module_never_measured_is_all_missing(tmp_path: Path) -> None:
    first, second, *_ = GUARDED
    record(tmp_path / "partial", {name: statements(name) for name in GUARDED if name != second})
    assert missing_lines(tmp_path / "partial") == {second: sorted(statements(second))}
    assert first not in missing_lines(tmp_path / "partial")


def test_the_guarded_modules_exist() -> None:
    # A module moved or renamed must take its place in the list with it.
    assert all((REPO_ROOT / name).is_file() for name in GUARDED)
