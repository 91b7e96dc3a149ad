"""Mutation testing of the modules that guard the gate, one module at a time (issue 13).

    .venv/bin/python tests/mutation/run.py                 # every module, then the table mutants
    .venv/bin/python tests/mutation/run.py --module cors   # one module (repeatable)
    .venv/bin/python tests/mutation/run.py --tables-only   # only the hand-written mutants

mutmut reads its settings from the working directory's pyproject.toml and keeps its state in
``mutants/`` there, so each module runs in its own scratch copy of the repository under
``mutants/<module>/`` (git-ignored) whose pyproject.toml gets a generated ``[tool.mutmut]``
section: the real pyproject.toml never carries one, and one module's stats never mix with
another's. The hand-written mutants of ``table_mutants.toml`` (module-level tables and
decorated functions, which mutmut does not mutate) are applied to a scratch copy each and
count as killed when their tests fail.

Score = killed / (total - listed equivalents); a timeout counts as killed (the mutant hung
the code, which a test noticed by not finishing). Exit status 1 when a module is below
``--threshold`` (0 by default: this measures, it does not gate yet).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRATCH = ROOT / "mutants"
CONFIG = HERE / "mutation.toml"
EQUIVALENTS = HERE / "equivalents.txt"
TABLE_MUTANTS = HERE / "table_mutants.toml"
BIN = Path(sys.executable).parent

KILLED_CODES = {1, 3, 36, -24, 24, 152, 255}  # test failure, pytest internal error, timeouts
SURVIVED_CODES = {0}
LIST_AT_MOST = 40  # of the unkilled mutants printed per module


@dataclass
class Score:
    name: str
    killed: int
    survived: list[str]
    other: list[str]  # no tests, not checked, suspicious, errors
    equivalent: int

    @property
    def counted(self) -> int:
        return self.killed + len(self.survived) + len(self.other)

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.counted if self.counted else 100.0


@dataclass(frozen=True)
class Equivalent:
    reason: str
    # The mutant's changed lines, hashed: mutmut numbers a function's mutants in order, so
    # an edit to the function can move a listed id onto another mutant, even a real survivor.
    fingerprint: str | None


def load_equivalents() -> dict[str, Equivalent]:
    found: dict[str, Equivalent] = {}
    for line in EQUIVALENTS.read_text("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ident, _, rest = line.partition(" ")
            rest = rest.strip()
            fingerprint = None
            if rest.startswith("@"):
                fingerprint, _, rest = rest[1:].partition(" ")
            if not rest.strip():
                raise SystemExit(f"equivalents.txt: {ident} has no reason")
            found[ident] = Equivalent(rest.strip(), fingerprint)
    return found


def mutant_sources(where: Path, file: str) -> dict[str, str]:
    """Every function of mutmut's rewritten copy of ``file`` in scratch ``where``, by name:
    the original (``..._mutmut_orig``) and each mutant (``..._mutmut_N``)."""
    path = where / "mutants" / file
    if not path.exists():
        return {}
    text = path.read_text("utf-8")
    sources: dict[str, str] = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name:
            sources[node.name] = ast.get_source_segment(text, node) or ""
    return sources


def fingerprint(sources: dict[str, str], ident: str) -> str | None:
    """A short hash of the lines a mutant changes in its function (None: no such mutant)."""
    name = ident.rsplit(".", 1)[-1]
    function, _, _ = name.rpartition("__mutmut_")
    mutant, original = sources.get(name), sources.get(function + "__mutmut_orig")
    if mutant is None or original is None:
        return None
    old = original.replace(function + "__mutmut_orig", function).splitlines()
    new = mutant.replace(name, function).splitlines()
    changed = [
        line.strip()
        for line in difflib.unified_diff(old, new, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return hashlib.sha1("\n".join(changed).encode()).hexdigest()[:10]


def _toml_value(value: Any) -> str:
    # json's string and list syntax is valid TOML for the plain values used here.
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def make_scratch(where: Path) -> None:
    """A fresh copy of what the tests need: the package, the tests and the pyproject.toml."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "tray_app", where / "tray_app", ignore=ignore)
    shutil.copytree(ROOT / "tests", where / "tests", ignore=ignore)
    shutil.copytree(ROOT / "resources", where / "resources", ignore=ignore)  # the web page
    shutil.copy2(ROOT / "pyproject.toml", where / "pyproject.toml")


def run_module(name: str, module: dict[str, Any], shared: dict[str, Any], jobs: int) -> Path:
    where = SCRATCH / name
    make_scratch(where)
    settings = {
        **shared,
        "source_paths": ["tray_app"],
        "only_mutate": [module["file"]],
        "also_copy": ["resources"],
        "pytest_add_cli_args_test_selection": module["tests"],
    }
    lines = "".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items())
    section = "\n[tool.mutmut]\n" + lines
    with (where / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write(section)
    print(f"== {name}: mutmut run on {module['file']}", flush=True)
    # mutmut's own output is long; it goes to a log beside its state.
    log = where / "mutmut.log"
    with log.open("w", encoding="utf-8") as out:
        subprocess.run(
            [str(BIN / "mutmut"), "run", "--max-children", str(jobs)],
            cwd=where,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    return where


def score_module(name: str, where: Path, file: str, equivalents: dict[str, Equivalent]) -> Score:
    meta = where / "mutants" / (file + ".meta")
    if not meta.exists():
        print(f"   no results: see {where / 'mutmut.log'}")
        return Score(name, 0, [], ["<mutmut failed>"], 0)
    codes: dict[str, int | None] = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
    sources = mutant_sources(where, file)
    score = Score(name, 0, [], [], 0)
    for ident, code in sorted(codes.items()):
        listed = equivalents.get(ident)
        if listed is not None and listed.fingerprint != fingerprint(sources, ident):
            found = fingerprint(sources, ident)
            score.other.append(
                f"{ident} (listed as equivalent, but its mutant's fingerprint is @{found}, "
                f"not @{listed.fingerprint}: a stale id? re-read the mutant, then fix the line)"
            )
        elif ident in equivalents and code in KILLED_CODES:
            # mutmut numbers a function's mutants in order, so an edit to the function moves
            # the ids: a listed id that a test kills now names another mutant.
            score.other.append(f"{ident} (listed as equivalent but killed: a stale id?)")
        elif ident in equivalents:
            score.equivalent += 1
        elif code in KILLED_CODES:
            score.killed += 1
        elif code in SURVIVED_CODES:
            score.survived.append(ident)
        else:
            score.other.append(f"{ident} (exit {code})")
    # A listed id this module no longer has (its function lost mutants) is as stale.
    prefix = file.removesuffix(".py").replace("/", ".") + "."
    for ident in sorted(set(equivalents) - set(codes)):
        if ident.startswith(prefix):
            score.other.append(f"{ident} (listed as equivalent but no such mutant: a stale id?)")
    return score


def print_fingerprints(names: list[str], modules: dict[str, dict[str, Any]]) -> None:
    """Each listed equivalent of these modules with its mutant's fingerprint, from the last
    run's scratch copies: for writing equivalents.txt after reading the mutants."""
    equivalents = load_equivalents()
    for name in names:
        file = modules[name]["file"]
        sources = mutant_sources(SCRATCH / name, file)
        prefix = file.removesuffix(".py").replace("/", ".") + "."
        for ident, listed in equivalents.items():
            if ident.startswith(prefix):
                print(f"{ident}  @{fingerprint(sources, ident)}  {listed.reason}")


def _run_table_mutant(entry: dict[str, Any]) -> tuple[str, str]:
    """Apply one hand-written mutant to its own scratch copy and run its tests: a verdict."""
    ident = entry["id"]
    where = SCRATCH / "_tables" / ident
    make_scratch(where)
    try:
        target = where / entry["file"]
        text = target.read_text("utf-8")
        if text.count(entry["original"]) != 1:
            # A stale entry must not pass as a kill: the code it mutates has moved.
            return ident, f"original text found {text.count(entry['original'])}x"
        target.write_text(text.replace(entry["original"], entry["replacement"]), "utf-8")
        result = subprocess.run(
            [str(BIN / "python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
            + entry["tests"],
            cwd=where,
            env={"PYTHONPATH": str(where), "PATH": str(BIN) + ":/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=False,
        )
        return ident, {0: "survived", 1: "killed"}.get(
            result.returncode, f"pytest exit {result.returncode}"
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_table_mutants(
    selected: set[str] | None, equivalents: dict[str, Equivalent], jobs: int
) -> Score:
    entries: list[dict[str, Any]] = tomllib.loads(TABLE_MUTANTS.read_text("utf-8"))["mutant"]
    score = Score("table mutants", 0, [], [], 0)
    chosen = []
    for entry in entries:
        if selected is not None and entry.get("module") not in selected:
            continue
        if entry["id"] in equivalents:
            score.equivalent += 1
        else:
            chosen.append(entry)
    # Each mutant has its own scratch copy, so they run side by side like mutmut's workers.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for ident, verdict in pool.map(_run_table_mutant, chosen):
            print(f"   {ident}: {verdict}", flush=True)
            if verdict == "killed":
                score.killed += 1
            elif verdict == "survived":
                score.survived.append(ident)
            else:
                score.other.append(f"{ident} ({verdict})")
    return score


def print_table(scores: list[Score], *, details: bool = True) -> None:
    print(f"\n{'module':<16}{'killed':>8}{'survived':>10}{'other':>7}{'equiv':>7}{'score':>9}")
    for s in scores:
        print(
            f"{s.name:<16}{s.killed:>8}{len(s.survived):>10}{len(s.other):>7}"
            f"{s.equivalent:>7}{s.percent:>8.1f}%"
        )
    for s in scores if details else ():
        for ident in (s.survived + s.other)[:LIST_AT_MOST]:
            print(f"  {s.name}: {ident}")
        if len(s.survived) + len(s.other) > LIST_AT_MOST:
            print(f"  {s.name}: ... (`mutmut results` in mutants/{s.name}/ lists all)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="run only this module (repeatable)")
    parser.add_argument("--tables-only", action="store_true", help="only the hand-written mutants")
    parser.add_argument("--no-tables", action="store_true", help="skip the hand-written mutants")
    parser.add_argument("--jobs", type=int, default=1, help="workers (mutmut and table mutants)")
    parser.add_argument("--threshold", type=float, default=0.0, help="fail below this score")
    parser.add_argument(
        "--fingerprints",
        action="store_true",
        help="print the listed equivalents with their mutants' fingerprints from the last run",
    )
    args = parser.parse_args()

    config = tomllib.loads(CONFIG.read_text("utf-8"))
    modules: dict[str, dict[str, Any]] = config["modules"]
    unknown = set(args.module or ()) - set(modules)
    if unknown:
        parser.error(f"unknown module(s) {sorted(unknown)}; known: {sorted(modules)}")
    names = args.module or list(modules)
    if args.fingerprints:
        print_fingerprints(names, modules)
        return 0
    equivalents = load_equivalents()

    scores = []
    if not args.tables_only:
        for name in names:
            where = run_module(name, modules[name], config["mutmut"], args.jobs)
            scores.append(score_module(name, where, modules[name]["file"], equivalents))
            print_table(scores[-1:], details=False)
    if not args.no_tables:
        selected = set(args.module) if args.module else None
        scores.append(run_table_mutants(selected, equivalents, args.jobs))
    print_table(scores)
    return 1 if any(s.percent < args.threshold for s in scores) else 0


if __name__ == "__main__":
    sys.exit(main())
