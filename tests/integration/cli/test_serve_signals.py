"""Headless `lmgate` stopped by SIGINT, SIGTERM or SIGHUP: the orderly stop (tunnel and agent
first, answers finish within server.shutdown_grace, usage written), exit 0; a second signal
during it ends LM Gate at once, the agent stopped all the same; a logout's SIGTERM and SIGHUP,
milliseconds apart, are one stop. Both as `lmgate serve` and as a plain `lmgate --go-public`
that found no display and fell back to serving. The answers stream from the gateway's own port
(the grace is for those: a tunnel's connections end with its agent, which goes first).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import FAKE_NGROK_AGENT, LMGATE, cli_env, free_port
from tests.stopping import (
    TOKEN,
    PublicHome,
    Stream,
    public_home,
    running,
    status_of,
    wait_gone,
)
from tray_app.cli.main import STOP_SIGNALS
from tray_app.config.settings import Config, TunnelProvider
from tray_app.control.going_public import stop_agent_now
from tray_app.control.service import SAME_STOP_SECONDS
from tray_app.secret_store.base import MemorySecretStore
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, NgrokProvider

# `lmgate serve`, and `lmgate` itself where there is no desktop (a --go-public wish: public).
LAUNCHES = {"serve": ["serve", "--tunnel", "ngrok"], "fallback": ["--go-public"]}
GRACE = 6.0
SLACK = 8.0


def start(home: PublicHome, tmp_path: Path, launch: str) -> subprocess.Popen[str]:
    variables = {
        k: v
        for k, v in home.vars.items()
        if k not in {"DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"}
    }
    # Files, not pipes: an agent left behind would hold a pipe open, and the test with it.
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        return subprocess.Popen(
            [LMGATE, *LAUNCHES[launch]], env=variables, stdout=out, stderr=err, text=True
        )


def public_lmgate(
    tmp_path: Path, lmstudio: FakeLMStudio, launch: str, *, chunks: int
) -> tuple[PublicHome, subprocess.Popen[str], int]:
    lmstudio.behaviour.chunks = chunks
    lmstudio.behaviour.chunk_delay = 0.25
    home = public_home(cli_env(tmp_path), tmp_path, lmstudio.url, grace=GRACE)
    proc = start(home, tmp_path, launch)
    home.wait_public(proc)
    return home, proc, home.agent_pid()


def ended(
    proc: subprocess.Popen[str],
    seconds: float,
    tmp_path: Path,
    agent: int | None,
    agent_within: float = 5,
) -> tuple[str, str]:
    """stdout and stderr, once lmgate ended within ``seconds`` and its agent within
    ``agent_within`` more (checked here, before the cleanup would kill a left one)."""
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds:g} s after the signal") from None
    if agent is not None:
        assert wait_gone(agent, agent_within), f"the agent (pid {agent}) outlived lmgate"
    return (tmp_path / "out").read_text(), (tmp_path / "err").read_text()


def leave_nothing_running(proc: subprocess.Popen[str], agent: int) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if running(agent):
        os.kill(agent, signal.SIGKILL)


# Every signal for the fallback, the case; `serve` shares its code, so one signal there
# (the one it newly takes) keeps the run short.
CASES = [
    *(pytest.param(s, "fallback", id=f"{s.name}-fallback") for s in STOP_SIGNALS),
    pytest.param(signal.SIGHUP, "serve", id="SIGHUP-serve"),
]


@pytest.mark.parametrize(("signum", "launch"), CASES)
def test_a_stop_signal_stops_in_order_and_leaves_no_agent(
    signum: signal.Signals, launch: str, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    home, proc, agent = public_lmgate(tmp_path, lmstudio_thread, launch, chunks=8)  # 2 s
    try:
        stream = Stream(home.local_url, home.key).start()
        proc.send_signal(signum)
        out, err = ended(proc, GRACE + SLACK, tmp_path, agent)
    finally:
        leave_nothing_running(proc, agent)
    assert proc.returncode == 0, err
    assert "Stopped." in out
    assert wait_gone(agent), f"the agent (pid {agent}) outlived lmgate"
    stream.join()
    assert stream.finished or stream.ended_with_error, stream.events[-3:]
    requests, completion_tokens = home.usage()["streamer"]
    assert requests == 1 and completion_tokens > 0


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_second_signal_ends_at_once_and_still_no_agent(
    launch: str, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    home, proc, agent = public_lmgate(tmp_path, lmstudio_thread, launch, chunks=80)  # 20 s
    try:
        stream = Stream(home.local_url, home.key).start()
        proc.send_signal(signal.SIGTERM)
        # The orderly stop is under way, waiting for the answer; past the quiet time, so the
        # next signal is a second stop, not part of the first.
        time.sleep(SAME_STOP_SECONDS + 0.2)
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        out, err = ended(proc, 5, tmp_path, agent, agent_within=1)
        took = time.monotonic() - started
    finally:
        leave_nothing_running(proc, agent)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "Stopping at once" in out and "Stopped." not in out
    assert took < 3, f"the second signal took {took:.1f} s"
    assert not running(agent), f"the agent (pid {agent}) outlived lmgate"
    stream.join(10)
    assert not stream.finished  # cut short: what a second signal asks for


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_logouts_sigterm_and_sighup_together_are_one_orderly_stop(
    launch: str, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    """systemd stops a session's processes with SIGTERM and at once SIGHUP (and SIGCONT)."""
    home, proc, agent = public_lmgate(tmp_path, lmstudio_thread, launch, chunks=8)  # 2 s
    try:
        stream = Stream(home.local_url, home.key).start()
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCONT):
            os.kill(proc.pid, signum)
        out, err = ended(proc, GRACE + SLACK, tmp_path, agent)
    finally:
        leave_nothing_running(proc, agent)
    assert proc.returncode == 0, err
    assert "Stopping at once" not in out and "Stopped." in out
    assert wait_gone(agent), f"the agent (pid {agent}) outlived lmgate"
    stream.join()
    assert stream.finished, stream.events[-3:]
    requests, completion_tokens = home.usage()["streamer"]
    assert requests == 1 and completion_tokens > 0


def opening_lmgate(
    tmp_path: Path, lmstudio: FakeLMStudio, delay: float = 3.0
) -> tuple[PublicHome, subprocess.Popen[str], int]:
    """`lmgate` whose agent runs but has not opened its tunnel yet (a slow network)."""
    home = public_home(cli_env(tmp_path), tmp_path, lmstudio.url, grace=GRACE)
    home.vars["FAKE_NGROK_START_DELAY"] = str(delay)
    proc = start(home, tmp_path, "fallback")
    agent = home.agent_pid()
    time.sleep(0.5)
    return home, proc, agent


def left_in_the_agents_directory(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "data" / "ngrok").iterdir())


def test_a_stop_while_the_tunnel_opens_closes_it(
    tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    _home, proc, agent = opening_lmgate(tmp_path, lmstudio_thread)
    try:
        proc.send_signal(signal.SIGTERM)
        _out, err = ended(proc, GRACE + SLACK + 3, tmp_path, agent)
    finally:
        leave_nothing_running(proc, agent)
    assert proc.returncode == 0, err
    assert wait_gone(agent), f"the agent (pid {agent}) outlived lmgate"
    assert left_in_the_agents_directory(tmp_path) == []


def test_a_second_signal_while_the_tunnel_opens_still_stops_the_agent(
    tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    """The agent is stopped by its PID file, which must exist while pyngrok still waits for
    the agent's first lines."""
    # Long enough that an agent left running is seen: it dies of its closed pipe only when it
    # next writes, after the delay.
    _home, proc, agent = opening_lmgate(tmp_path, lmstudio_thread, delay=8.0)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # a person's quick second Ctrl-C
        out, err = ended(proc, 5, tmp_path, agent, agent_within=1)
    finally:
        leave_nothing_running(proc, agent)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Stopping at once" in out
    assert wait_gone(agent, 1.0), f"the agent (pid {agent}) outlived lmgate"
    assert left_in_the_agents_directory(tmp_path) == []


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """An "LM Studio" that takes connections and never answers: the start's probe waits."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_stop_during_the_start_does_not_go_public(tmp_path: Path, silent_upstream: str) -> None:
    home = public_home(cli_env(tmp_path), tmp_path, silent_upstream, grace=GRACE)
    proc = start(home, tmp_path, "serve")
    try:
        deadline = time.monotonic() + 20
        while True:  # the gateway listens: the start is probing LM Studio
            assert proc.poll() is None, (tmp_path / "err").read_text()
            assert time.monotonic() < deadline, "the gateway never listened"
            try:
                if status_of(home.local_url + "/healthz") == 200:
                    break
            except OSError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = ended(proc, 30, tmp_path, None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        started = [
            json.loads(line)["pid"]
            for line in (home.record.read_text().splitlines() if home.record.exists() else ())
            if '"start"' in line
        ]
        for pid in started:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Going public" not in out
    assert started == [], "an agent was started after the stop was asked for"


class TestStopAgentNow:
    """The second signal's path to the agent: from any thread, while it still runs."""

    async def test_stops_a_running_agent_and_removes_its_token_file(self, tmp_path: Path) -> None:
        secrets = MemorySecretStore({NGROK_AUTHTOKEN: TOKEN})
        config = Config(
            tunnel_provider=TunnelProvider.NGROK, tunnel_ngrok_path=str(FAKE_NGROK_AGENT)
        )
        provider = NgrokProvider(secrets, tmp_path / "ngrok", ngrok_path=str(FAKE_NGROK_AGENT))
        await provider.open(free_port())
        agent = provider.agent_pid
        assert agent is not None and running(agent)
        try:
            assert stop_agent_now(config, secrets, tmp_path)
            assert not running(agent)
            assert not provider.config_path.exists()
            assert not provider.pid_path.exists()
        finally:
            await provider.close()

    def test_without_an_agent_does_nothing(self, tmp_path: Path) -> None:
        secrets = MemorySecretStore({NGROK_AUTHTOKEN: TOKEN})
        ngrok = Config(tunnel_provider=TunnelProvider.NGROK)
        assert not stop_agent_now(ngrok, secrets, tmp_path)
        lan = Config(tunnel_provider=TunnelProvider.LAN)
        (tmp_path / "ngrok").mkdir()
        (tmp_path / "ngrok" / "agent.pid").write_text(f"{os.getpid()} ngrok.yml\n")
        assert not stop_agent_now(lan, secrets, tmp_path)  # not this config's agent to stop
        assert (tmp_path / "ngrok" / "agent.pid").exists()
