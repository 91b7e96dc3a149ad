"""The soak with faults (benchmarks/soak.py) runs, kills and restarts each part in turn, and
accounts for every request: a short run here (about a minute and a half); its figures come
from full runs, not from this test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
FAULTS = ["upstream", "tunnel", "replica", "redis", "postgres"]


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    from tests.helpers import missing_tool
    from tests.postgres_server import _binaries

    if _binaries() is None:
        missing_tool("PostgreSQL (initdb)", "LMGATE_REQUIRE_POSTGRES")
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "soak.py"), "--minutes", "0.5", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=BENCHMARKS,
    )
    assert out.exists(), done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(out.read_text())
    # The exit status says whether every check passed; the tests below say which did not.
    assert done.returncode == (0 if figures["passed"] else 1), done.stderr[-3000:]
    return figures, done.stdout


def _script_module() -> ModuleType:
    """benchmarks/soak.py as a module (it imports its siblings' way: from the repository)."""
    spec = importlib.util.spec_from_file_location("soak_script", BENCHMARKS / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_script"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def checks(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in figures["checks"]}


@pytest.mark.slow
def test_the_soak_reports_every_fault_and_every_key(soak: tuple[dict[str, Any], str]) -> None:
    figures, printed = soak
    assert [f["name"] for f in figures["faults"]] == FAULTS
    assert all(f["recovered_s"] is not None for f in figures["faults"]), figures["faults"]
    assert [u["principal"] for u in figures["usage"]] == [
        "alice",
        "bob",
        "carol",
        "probe",
        "monitor",
    ]
    assert figures["results"]["ok"] > 100
    assert sum(figures["results"].values()) == figures["requests"]
    for heading in ("## Faults", "## Usage: client against database", "## Resources", "## Checks"):
        assert heading in printed
    assert "asyncio tasks: not counted" in printed


@pytest.mark.slow
def test_no_request_is_lost_and_usage_and_budgets_match(soak: tuple[dict[str, Any], str]) -> None:
    found = checks(soak[0])
    wanted = [
        "every fault recovered",
        "no request lost that had not started",
        "no refusal outside a fault",
        "every process ran to the end",
        "no leaked connection (replica 0, idle before and after)",
        "nothing held after idle (replica 0, /metrics)",
        "nothing held after idle (replica 1, /metrics)",
    ]
    for who in ("alice", "bob", "carol", "probe", "monitor"):
        wanted += [f"usage of {who}", f"budget of {who} (tokens used today)"]
    failed = [f"{name}: {found[name]['detail']}" for name in wanted if not found[name]["passed"]]
    assert not failed, failed


@pytest.mark.slow
def test_no_descriptor_is_leaked(soak: tuple[dict[str, Any], str]) -> None:
    check = checks(soak[0])["no leaked file descriptor (replica 0, idle before and after)"]
    assert check["passed"], check["detail"]


def test_a_pool_that_grew_within_its_bound_is_no_leak() -> None:
    script = _script_module()
    before = {"fds": 10, "fds: socket": 5, "tcp_established": 3, "tcp to redis": 2}
    grown = {**before, "fds": 12, "fds: socket": 7, "tcp_established": 5, "tcp to redis": 4}
    assert script.leaked(before, grown) == {"descriptors": [], "connections": []}
    pipe = {**before, "fds": 11, "fds: pipe": 1}
    assert script.leaked(before, pipe)["descriptors"] != []
    waiting = {**before, "fds": 11, "fds: socket": 6, "sockets: CLOSE_WAIT": 1}
    assert script.leaked(before, waiting)["connections"] != []
    # A pooled connection whose server went away is still the pool's (dropped when taken).
    stale = {**before, "fds": 11, "fds: socket": 6, "tcp to redis": 3}
    stale["info: tcp to redis closed by the server"] = 1
    assert script.leaked(before, stale) == {"descriptors": [], "connections": []}


def test_a_cut_is_excused_only_by_a_fault_on_its_path() -> None:
    script = _script_module()
    fault = script.Fault("replica", at=10.0, paths=("r1",))
    on_path = script.Outcome("alice", "chat", "r1", 9.8, 10.2, "cut")
    elsewhere = script.Outcome("alice", "chat", "r0", 9.8, 10.2, "cut")
    later = script.Outcome("alice", "chat", "r1", 20.0, 20.1, "cut")
    script.excuse_cuts([on_path, elsewhere, later], [fault])
    assert (on_path.excused_by, elsewhere.excused_by, later.excused_by) == ("replica", "", "")
