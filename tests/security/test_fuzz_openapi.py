"""Schemathesis against the real `lmgate serve`, from docs/openapi.yaml: over 10,000 generated
requests, and the gateway's own access log must show no 5xx — except 502/504 once LM Studio is
stopped — and no internal error.

Every route is on (/v1/responses, /v1/messages and its count_tokens too), and every documented
endpoint must have been asked. A pass with a key whose token budget is tiny meets the budget's
429 on every generation endpoint (issue 21)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import LMGATE, REPO_ROOT, cli_env, start_serve

ROOT = REPO_ROOT
ST = str(Path(sys.executable).with_name("st"))


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return start_serve(env, stderr=sink)


# Each answer of the stream check takes its pacing (half a second): it gets fewer examples, in
# a pass of its own, so the fuzz run keeps its time.
PACED = "/stream-check"


# Every endpoint that spends a token budget.
GENERATIONS = r"^/(v1/(chat/completions|completions|embeddings|responses|messages)|api/chat)$"


def _fuzz(url: str, key: str, examples: int, out: Path, *only: str) -> int:
    result = subprocess.run(
        [
            ST,
            "run",
            str(ROOT / "docs" / "openapi.yaml"),
            "--url",
            url,
            "-H",
            f"Authorization: Bearer {key}",
            "--max-examples",
            str(examples),
            "--checks",
            "not_a_server_error",
            "--seed",
            "20261126",
            # Not the stateful phase: the response schemas give it links to follow, and it
            # would double the run's time for requests the other phases already make.
            "--phases",
            "examples,coverage,fuzzing",
            *only,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out.write_text(result.stdout + result.stderr)
    match = re.search(r"(\d+) generated", result.stdout)
    assert match, result.stdout[-2000:]
    return int(match.group(1))


def _records(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text().split("\n"):  # exactly one record per line
        if '"lmgate.access"' in line:
            records.append(json.loads(line))
        assert "internal error" not in line and "Traceback" not in line, line
    return records


def _statuses(records: list[dict[str, Any]]) -> list[int]:
    # /readyz answering 503 while LM Studio is stopped is its whole purpose.
    return [r["status"] for r in records if not (r["path"] == "/readyz" and r["status"] == 503)]


def _documented_paths() -> list[str]:
    paths = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())["paths"]
    return list(paths)


def _asked(records: list[dict[str, Any]], documented: str) -> bool:
    """Whether some request reached ``documented`` (a placeholder matches any rest)."""
    prefix = documented.split("{", 1)[0]
    if prefix == documented:
        return any(r["path"] == documented for r in records)
    return any(r["path"].startswith(prefix) and r["path"] != prefix for r in records)


@pytest.mark.slow
def test_ten_thousand_generated_requests_cause_no_server_error(tmp_path: Path) -> None:
    if not Path(ST).exists():
        pytest.fail("schemathesis (a test dependency) is missing")
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "fast_upstream.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert upstream.stdout is not None
    port = upstream.stdout.readline().split()[1]
    env = cli_env(tmp_path).vars
    env.update(
        {
            "LMGATE_UPSTREAM_URL": f"http://127.0.0.1:{port}",
            # Limits stay on; high enough that the fuzzer meets the handlers, not 429s.
            "LMGATE_LIMITS_REQUESTS_PER_MINUTE": "100000000",
            "LMGATE_LIMITS_CONCURRENT_REQUESTS": "1000",
            "LMGATE_LIMITS_AUTH_FAILURES_PER_MINUTE": "10000",
            "LMGATE_LIMITS_PAIRING_ATTEMPTS_PER_MINUTE": "10000",
            # Every route on: the token counter is /v1/messages' own.
            "LMGATE_ROUTES_ENABLE_RESPONSES": "true",
            "LMGATE_ROUTES_ENABLE_MESSAGES": "true",
        }
    )
    # 20 tokens a day: the first generation or two spend it, the rest meet budget_exceeded.
    budgeted = subprocess.run(
        [
            *(LMGATE, "key", "create", "budgeted", "--scope", "chat", "--scope", "embeddings"),
            *("--budget-day", "20"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    key = subprocess.run(
        [
            LMGATE,
            "key",
            "create",
            "fuzz",
            "--scope",
            "chat",
            "--scope",
            "models",
            "--scope",
            "embeddings",
            "--scope",
            "metrics",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    log = tmp_path / "gateway.log"
    gateway, url = _serve(env, log)
    try:
        generated = _fuzz(url, key, 1000, tmp_path / "fuzz-running.txt", "--exclude-path", PACED)
        generated += _fuzz(url, key, 60, tmp_path / "fuzz-paced.txt", "--include-path", PACED)
        generated += _fuzz(
            url, budgeted, 60, tmp_path / "fuzz-budget.txt", "--include-path-regex", GENERATIONS
        )
        upstream.terminate()
        upstream.wait(10)
        stopped = _fuzz(url, key, 60, tmp_path / "fuzz-stopped.txt", "--exclude-path", PACED)
    finally:
        gateway.terminate()
        gateway.wait(30)
        assert gateway.stdout is not None
        gateway.stdout.close()
        if upstream.poll() is None:
            upstream.kill()
        upstream.stdout.close()
    records = _records(log)
    statuses = _statuses(records)
    assert generated >= 10_000, generated
    assert [p for p in _documented_paths() if not _asked(records, p)] == []
    counted = [r for r in records if r["path"] == "/v1/messages/count_tokens"]
    assert any(r["status"] == 200 for r in counted), "the token counter was never answered"
    assert any(r.get("error") == "budget_exceeded" for r in records)
    assert len(statuses) >= generated - 50  # /readyz's own 503s are not counted
    server_errors = [s for s in statuses if s >= 500]
    assert set(server_errors) <= {502, 504}, sorted(set(server_errors))
    assert stopped > 0
    by_path: dict[str, int] = {}
    for record in records:
        by_path[record["path"]] = by_path.get(record["path"], 0) + 1
    print(
        f"{generated + stopped} generated requests; {len(statuses)} answered; "
        f"5xx: {len(server_errors)} (all 502/504, after LM Studio stopped); "
        f"count_tokens: {len(counted)}, /stream-check: {by_path.get(PACED, 0)}"
    )
