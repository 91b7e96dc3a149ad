"""Agent programs and processes, for every provider that runs one: finding and proving the
program (agent_binary) and running it as ours (agent_process), with real child processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tray_app.errors import TunnelError
from tray_app.tunnel.agent_binary import AgentKind, find_agent, on_path
from tray_app.tunnel.agent_process import AgentProcess, wait_gone

KIND = AgentKind(
    program="demo-agent",
    setting="tunnel.demo_path",
    version_args=("--version",),
    version=re.compile(r"demo-agent version (\d+\.\d+\.\d+)"),
    minimum=(2, 3, 0),
    install_help="Install demo-agent from example.invalid.",
)


def write_program(directory: Path, body: str, name: str = "demo-agent") -> Path:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "State:\tZ" not in status.read_text()


# ---- finding and proving the program ------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "usable"),
    [("2.3.0", True), ("2.10.1", True), ("3.0.0", True), ("2.2.9", False), ("1.99.99", False)],
)
def test_a_version_is_compared_by_numbers_on_both_sides_of_the_minimum(
    tmp_path: Path, version: str, usable: bool
) -> None:
    path = write_program(tmp_path, f'print("demo-agent version {version} (built today)")\n')
    if usable:
        assert find_agent(KIND, str(path)).version == version
    else:
        with pytest.raises(TunnelError, match=f"{version}.*needs version 2.3.0 or newer"):
            find_agent(KIND, str(path))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("import sys\nsys.exit(3)\n", "failed \\(exit status 3\\)"),
        ('print("something else 1.2.3")\n', "did not print a demo-agent version"),
        ("import time\ntime.sleep(30)\n", "did not answer within"),
    ],
)
def test_a_program_that_is_not_a_working_agent_is_refused_with_why(
    tmp_path: Path, body: str, reason: str
) -> None:
    path = write_program(tmp_path, body)
    started = time.monotonic()
    with pytest.raises(TunnelError, match=reason) as caught:
        find_agent(KIND, str(path))
    assert "tunnel.demo_path" in str(caught.value)
    assert "Install demo-agent" in str(caught.value)
    assert time.monotonic() - started < 15


def test_a_version_command_that_downloads_finds_every_proxy_closed(tmp_path: Path) -> None:
    # A downloader posing as the agent: whatever it fetches goes to a closed port.
    seen = tmp_path / "seen.json"
    path = write_program(
        tmp_path,
        f"""
        import json, os
        keys = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
        json.dump({{k: os.environ.get(k) for k in keys}}, open({str(seen)!r}, "w"))
        print("demo-agent version 2.4.0")
        """,
    )
    find_agent(KIND, str(path))
    proxies = json.loads(seen.read_text())
    assert set(proxies.values()) == {"http://127.0.0.1:9"}


def test_a_configured_path_that_is_no_program_is_named(tmp_path: Path) -> None:
    plain = tmp_path / "demo-agent"
    plain.write_text("not a program")
    with pytest.raises(TunnelError, match="not an executable demo-agent program"):
        find_agent(KIND, str(plain))
    with pytest.raises(TunnelError, match="not an executable"):
        find_agent(KIND, str(tmp_path / "missing"))


def test_path_is_searched_in_order_skipping_what_does_not_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken, good = tmp_path / "a", tmp_path / "b"
    broken.mkdir()
    good.mkdir()
    write_program(broken, "import sys\nsys.exit(1)\n")
    working = write_program(good, 'print("demo-agent version 2.5.1")\n')
    # An empty PATH entry is the current directory: never searched.
    monkeypatch.chdir(broken)
    monkeypatch.setenv("PATH", os.pathsep.join(["", str(broken), str(good)]))
    assert on_path("demo-agent") == [broken / "demo-agent", working]
    assert find_agent(KIND).path == working
    monkeypatch.setenv("PATH", str(broken))
    with pytest.raises(TunnelError, match=r"No usable demo-agent was found.*exit status 1"):
        find_agent(KIND)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(TunnelError, match=r"demo-agent is not installed.*does not download"):
        find_agent(KIND)


# ---- running it as ours --------------------------------------------------------------------

AGENT = """
import os, signal, sys, time
print("starting with secret " + os.environ.get("DEMO_SECRET", "none"), flush=True)
print("x" * 10000, flush=True)
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("EXIT_AFTER"):
    time.sleep(float(os.environ["EXIT_AFTER"]))
    sys.exit(4)
print("ready", flush=True)
time.sleep(120)
"""


def start_agent(tmp_path: Path, agent: AgentProcess, **env: str) -> tuple[Path, list[str]]:
    program = write_program(tmp_path, AGENT)
    marker = f"--state {tmp_path}"
    argv = [str(program), "--state", str(tmp_path)]
    agent.start(argv, {"PATH": os.environ["PATH"], **env}, marker)
    return program, argv


def wait_for(condition: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_the_secret_is_in_the_environment_never_the_command_line_nor_the_tail(
    tmp_path: Path,
) -> None:
    secret = "s3cr3t-" + "q" * 30
    lines: list[str] = []
    agent = AgentProcess(
        "demo-agent",
        tmp_path / "agent.pid",
        redact=lambda text: text.replace(secret, "[token]"),
        on_line=lines.append,
    )
    start_agent(tmp_path, agent, DEMO_SECRET=secret)
    try:
        wait_for(lambda: "ready" in agent.tail())
        assert agent.pid is not None
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline
        assert secret.encode() in Path(f"/proc/{agent.pid}/environ").read_bytes()
        assert "starting with secret [token]" in agent.tail()
        assert all(secret not in line for line in [*agent.tail(), *lines])
        # A line longer than the bound is cut into bounded pieces.
        assert max(len(line) for line in agent.tail()) <= 4096
        record = json.loads(agent.pid_path.read_text())
        assert record == {"pid": agent.pid, "marker": f"--state {tmp_path}"}
    finally:
        agent.stop()
    assert not agent.pid_path.exists()


def test_stop_ends_an_agent_that_ignores_sigterm_and_reports_no_exit(tmp_path: Path) -> None:
    exits: list[int] = []
    agent = AgentProcess("demo-agent", tmp_path / "agent.pid", on_exit=exits.append)
    start_agent(tmp_path, agent, IGNORE_TERM="1")
    wait_for(lambda: "ready" in agent.tail())
    pid = agent.pid
    assert pid is not None
    started = time.monotonic()
    agent.stop(timeout=1.0)
    assert time.monotonic() - started < 5
    assert not alive(pid)
    assert not agent.running
    time.sleep(0.2)
    assert exits == []  # asked for: not a lost tunnel


def test_an_exit_nobody_asked_for_is_reported_with_its_code(tmp_path: Path) -> None:
    exits: list[int] = []
    done = threading.Event()

    def exited(code: int) -> None:
        exits.append(code)
        done.set()

    agent = AgentProcess("demo-agent", tmp_path / "agent.pid", on_exit=exited)
    start_agent(tmp_path, agent, EXIT_AFTER="0.3")
    assert done.wait(10)
    assert exits == [4]
    agent.stop()


def test_a_crashed_runs_agent_is_stopped_by_the_next_and_a_foreign_process_is_not(
    tmp_path: Path,
) -> None:
    first = AgentProcess("demo-agent", tmp_path / "agent.pid")
    start_agent(tmp_path, first)
    pid = first.pid
    assert pid is not None
    # The "crash": the object is forgotten, the process and its PID file stay.
    second = AgentProcess("demo-agent", tmp_path / "agent.pid")
    assert second.stop_stale() is True
    assert wait_gone(pid, 5)
    assert not second.pid_path.exists()
    first.stop()  # only closes what the forgotten object held: the agent is gone

    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for marker in ("--state elsewhere", f"--state {tmp_path}"):
            second.pid_path.write_text(json.dumps({"pid": foreign.pid, "marker": marker}))
            assert second.stop_stale() is False
            assert foreign.poll() is None
            assert not second.pid_path.exists()
    finally:
        foreign.kill()
        foreign.wait()


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        "[]",
        '{"pid": "x", "marker": "m"}',
        '{"pid": 1}',
        '{"pid": -1, "marker": ""}',
    ],
)
def test_an_unreadable_pid_file_stops_nothing_and_is_removed(tmp_path: Path, content: str) -> None:
    agent = AgentProcess("demo-agent", tmp_path / "agent.pid")
    agent.pid_path.write_text(content)
    assert agent.stop_stale() is False
    assert not agent.pid_path.exists()


def test_the_marker_must_be_in_the_command_line(tmp_path: Path) -> None:
    agent = AgentProcess("demo-agent", tmp_path / "agent.pid")
    with pytest.raises(ValueError, match="marker"):
        agent.start([sys.executable, "-c", "pass"], {}, "--not-there")
    assert not agent.pid_path.exists()


def test_no_lmgate_variable_reaches_an_agent(tmp_path: Path) -> None:
    # LMGATE_SECRET_* holds the secret store's secrets when it is the environment.
    agent = AgentProcess("demo-agent", tmp_path / "agent.pid")
    start_agent(
        tmp_path,
        agent,
        LMGATE_SECRET_TOKEN_SIGNING_KEY="k" * 40,
        lmgate_secret_lower="x" * 20,
        KEEP_ME="1",
    )
    try:
        wait_for(lambda: "ready" in agent.tail())
        environ = Path(f"/proc/{agent.pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0] for entry in environ if entry}
        assert b"KEEP_ME" in names
        assert not any(name.upper().startswith(b"LMGATE_") for name in names)
        assert oct(agent.pid_path.stat().st_mode & 0o777) == "0o600"
    finally:
        agent.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_an_agent_dies_with_the_lm_gate_that_started_it_even_by_sigkill(tmp_path: Path) -> None:
    # Else it would go on forwarding the public URL's traffic (bearer tokens included) to a
    # port any local user could bind once LM Gate is gone.
    program = write_program(tmp_path, AGENT)
    lmgate = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, sys, threading, time
                from pathlib import Path
                from tray_app.tunnel.agent_process import AgentProcess
                agent = AgentProcess("demo-agent", Path({str(tmp_path / "agent.pid")!r}))
                # Started from a worker thread that lives on, as the event loop's executor's do.
                started = threading.Event()
                def start():
                    agent.start([{str(program)!r}, "--state", "x"], dict(os.environ), "--state x")
                    started.set()
                    time.sleep(600)
                threading.Thread(target=start, daemon=True).start()
                started.wait(10)
                # Killed only once the agent has said all it says: a write to a pipe whose
                # reader is gone would end it anyway, and prove nothing.
                while "ready" not in agent.tail():
                    time.sleep(0.02)
                print(agent.pid, flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parents[3]),
    )
    assert lmgate.stdout is not None
    agent_pid = int(lmgate.stdout.readline())
    assert alive(agent_pid)
    lmgate.kill()
    lmgate.wait()
    lmgate.stdout.close()
    # Not our child (its parent was killed): gone, or a zombie waiting for init to reap it.
    deadline = time.monotonic() + 5
    while alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(agent_pid), "the agent outlived the LM Gate that started it"


# ---- PATH entries that are not absolute ---------------------------------------------------


def test_a_relative_path_entry_is_never_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A working agent in the current directory and in "bin" under it: PATH entries "." and
    # "bin" would make relative paths that Popen looks up again on its own.
    (tmp_path / "bin").mkdir()
    write_program(tmp_path, 'print("demo-agent version 2.5.1")\n')
    write_program(tmp_path / "bin", 'print("demo-agent version 2.5.1")\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.pathsep.join([".", "bin", "./bin"]))
    assert on_path("demo-agent") == []
    with pytest.raises(TunnelError, match=r"demo-agent is not installed"):
        find_agent(KIND)
    absolute = tmp_path / "bin"
    monkeypatch.setenv("PATH", os.pathsep.join([".", "bin", str(absolute)]))
    assert on_path("demo-agent") == [absolute / "demo-agent"]
    assert find_agent(KIND).path == absolute / "demo-agent"


def test_the_pid_files_directory_is_made_private_but_an_existing_one_is_left_as_it_is(
    tmp_path: Path,
) -> None:
    # A PID file's directory is not always this code's to change (think of /tmp).
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o1777)
    for directory, mode in ((shared, 0o1777), (tmp_path / "new" / "state", 0o700)):
        agent = AgentProcess("demo-agent", directory / "agent.pid")
        start_agent(tmp_path, agent)
        try:
            assert directory.stat().st_mode & 0o7777 == mode
        finally:
            agent.stop()
