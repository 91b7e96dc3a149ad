"""benchmarks/gate_cost.py still runs and reports every side, in a tiny run; its figures are
not judged here (the overhead claim comes from the full run, on a quiet machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
SIDES = [
    "no gate (the recorder only, as before it)",
    "unbudgeted",
    "budgeted",
    "budgeted, no length",
]


def test_a_tiny_run_reports_each_side(tmp_path: Path) -> None:
    out = tmp_path / "gate.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gate_cost.py"),
            "--requests",
            "200",
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "| caller | per request (p50) | added by the gate |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == SIDES
    assert lines[2].endswith("| +0.0 µs |")
    figures = json.loads(out.read_text())
    assert list(figures) == SIDES
    # the gate does work: a budgeted request costs more than one that only records
    assert all(value > 0 for value in figures.values())
    assert figures["budgeted"] > figures[SIDES[0]]
