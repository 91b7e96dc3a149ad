"""What the CLI says when something needs doing: the serve banner when LM Studio wants a
token (it said "NOT reachable ... start its server"), `lmgate doctor` with the flags the
README promises (it refused --data-dir and --secret-store) and, on a port held by LM Gate
itself, that it is running (it failed the check), and never a Python class name."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import Env, start_serve

CLASS_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)*Error\b")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        return proc.stdout.read()


@pytest.fixture
def held_by_lmgate(env: Env) -> Iterator[int]:
    proc, url = start_serve(env.vars)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        stop(proc)


def test_serve_says_lm_studio_wants_a_token(env: Env, lmstudio_thread: FakeLMStudio) -> None:
    lmstudio_thread.behaviour.require_token = "sk-lm-right"
    proc, _url = start_serve({**env.vars, "LMGATE_UPSTREAM_URL": lmstudio_thread.url})
    out = stop(proc)
    line = next(x for x in out.splitlines() if x.startswith("LM Studio:"))
    assert f"{lmstudio_thread.url} wants a token (it answered 401)" in line
    assert "`lmgate secret set lmstudio-api-token`" in line
    assert "NOT reachable" not in out and "Start its server" not in out


def test_serve_still_says_when_lm_studio_is_down(env: Env) -> None:
    proc, _url = start_serve(env.vars)  # upstream http://127.0.0.1:9: nothing there
    out = stop(proc)
    assert "LM Studio:   NOT reachable at http://127.0.0.1:9. Start its server" in out
    assert "wants a token" not in out


def test_doctor_takes_data_dir_and_secret_store(env: Env, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    result = env.run(
        "doctor",
        "--data-dir",
        str(elsewhere),
        "--secret-store",
        "env",
        "--config",
        str(tmp_path / "none.toml"),
        extra={"XDG_STATE_HOME": str(tmp_path / "state")},
    )
    assert result.returncode in {0, 1}, result.stderr  # argparse refused them with 2
    assert f"data {elsewhere}" in result.stdout
    assert "env: LMGATE_SECRET_* environment variables" in result.stdout


def test_doctor_words_a_failure_without_class_names(env: Env, tmp_path: Path) -> None:
    result = env.run("doctor", extra={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert result.returncode == 1
    assert re.search(
        r"^FAIL\s+LM Studio\s+not reachable at http://127\.0\.0\.1:9 \(nothing accepts "
        r"connections there\)",
        result.stdout,
        re.M,
    ), result.stdout
    assert not CLASS_NAME.search(result.stdout), result.stdout


def test_doctor_on_a_port_lm_gate_holds_says_it_runs(
    env: Env, tmp_path: Path, held_by_lmgate: int
) -> None:
    result = env.run(
        "doctor",
        extra={"LMGATE_SERVER_PORT": str(held_by_lmgate), "XDG_STATE_HOME": str(tmp_path / "s")},
    )
    assert re.search(
        rf"^ok\s+port\s+127\.0\.0\.1:{held_by_lmgate} is LM Gate's: it is running already",
        result.stdout,
        re.M,
    ), result.stdout


def test_doctor_on_a_port_another_program_holds_fails(env: Env, tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = env.run(
            "doctor",
            extra={"LMGATE_SERVER_PORT": str(port), "XDG_STATE_HOME": str(tmp_path / "s")},
        )
    assert re.search(rf"^FAIL\s+port\s+127\.0\.0\.1:{port} is in use", result.stdout, re.M)


def test_check_words_a_failure_without_class_names(env: Env) -> None:
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        port = gone.getsockname()[1]
    result = env.run("check", f"http://127.0.0.1:{port}", "lmg_x")
    assert result.returncode == 1
    assert "not reachable: connection refused" in result.stdout
    assert "Cannot connect to host" not in result.stdout
    assert not CLASS_NAME.search(result.stdout), result.stdout
