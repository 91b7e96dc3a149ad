"""Schemathesis against the real `lmgate serve`, from docs/openapi.yaml: over 10,000 generated
requests, and the gateway's own access log must show no 5xx — except 502/504 once LM Studio is
stopped — and no internal error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LMGATE, REPO_ROOT, cli_env, start_serve

ROOT = REPO_ROOT
ST = str(Path(sys.executable).with_name("st"))


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return start_serve(env, stderr=sink)


# Each answer of the stream check takes its pacing (half a second): it gets fewer examples, in
# a pass of its own, so the fuzz run keeps its time.
PACED = "/stream-check"


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


def _statuses(log: Path) -> list[int]:
    statuses = []
    for line in log.read_text().split("\n"):  # exactly one record per line
        if '"lmgate.access"' in line:
            record = json.loads(line)
            # /readyz answering 503 while LM Studio is stopped is its whole purpose.
            if not (record["path"] == "/readyz" and record["status"] == 503):
                statuses.append(record["status"])
        assert "internal error" not in line and "Traceback" not in line, line
    return statuses


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
        }
    )
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
    statuses = _statuses(log)
    assert generated >= 10_000, generated
    assert len(statuses) >= generated - 50  # /readyz's own 503s are not counted
    server_errors = [s for s in statuses if s >= 500]
    assert set(server_errors) <= {502, 504}, sorted(set(server_errors))
    assert stopped > 0
    print(
        f"{generated + stopped} generated requests; {len(statuses)} answered; "
        f"5xx: {len(server_errors)} (all 502/504, after LM Studio stopped)"
    )
