"""Every line of the modules that guard the gate is run by the suite: tests/run.sh calls this
after pytest, on the data pytest-cov left in .coverage.

A line no test reaches is a check no test proves; such a line is either given a test or shown
to be dead and removed. Branch coverage is printed by pytest-cov next to this; only lines are
held at 100% here.

Usage: python -m tests.coverage_guard"""

from __future__ import annotations

import sys
from pathlib import Path

import coverage

REPO_ROOT = Path(__file__).resolve().parent.parent

# The modules between a request and what it may reach: routing, body and header rules, CORS,
# host and connection limits, the protections, and every kind of credential.
GUARDED = (
    "tray_app/addresses.py",
    "tray_app/gateway/accounting.py",
    "tray_app/gateway/body_rules.py",
    "tray_app/gateway/budgets.py",
    "tray_app/gateway/cors.py",
    "tray_app/gateway/fair_queue.py",
    "tray_app/gateway/headers.py",
    "tray_app/gateway/hosts.py",
    "tray_app/gateway/limits.py",
    "tray_app/gateway/protection.py",
    "tray_app/gateway/routes.py",
    "tray_app/gateway/sharing.py",
    "tray_app/gateway/upstream/model_api.py",
    "tray_app/gateway/upstream/model_guard.py",
    "tray_app/gateway/upstream/token_counts.py",
    "tray_app/identity/access.py",
    "tray_app/identity/api_keys.py",
    "tray_app/identity/authenticator.py",
    "tray_app/identity/pairing.py",
    "tray_app/identity/principal.py",
    "tray_app/identity/tokens.py",
    "tray_app/storage/budgets.py",
    "tray_app/ui/stop_signals.py",
    "tray_app/ui/warm_up_window.py",
)


def missing_lines(data_file: Path) -> dict[str, list[int]]:
    """Each guarded module's lines that no test ran (an unmeasured module: all of them)."""
    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    measured = {Path(name).resolve() for name in cov.get_data().measured_files()}
    missing: dict[str, list[int]] = {}
    for relative in GUARDED:
        path = REPO_ROOT / relative
        if not path.is_file():
            missing[relative] = [0]  # moved or renamed: this list must follow it
            continue
        _, statements, _, not_run, _ = cov.analysis2(str(path))
        if path.resolve() not in measured:
            not_run = statements
        if not_run:
            missing[relative] = sorted(not_run)
    return missing


def main() -> int:
    missing = missing_lines(REPO_ROOT / ".coverage")
    for relative, lines in missing.items():
        where = "the file is missing" if lines == [0] else ", ".join(map(str, lines))
        print(f"not covered: {relative}: {where}", file=sys.stderr)
    if missing:
        print(
            f"{len(missing)} of {len(GUARDED)} guarded modules are below 100% line coverage",
            file=sys.stderr,
        )
        return 1
    print(f"all {len(GUARDED)} guarded modules: 100% line coverage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
