"""The tray app stopped from outside: SIGTERM (a desktop session's logout, `kill`), SIGINT and
SIGHUP run Quit's orderly shutdown, and a second signal during it ends the app at once (a
logout's SIGTERM and SIGHUP, milliseconds apart, are one stop) — in both cases without leaving
the tunnel's agent running (it has a session of its own, so no signal sent to the tray reaches
it). So does a stop while the tunnel still opens; the X server going away, not yet.

First StopSignals itself in this process, then the real `lmgate` on Xvfb with trayer as the
tray host (tests/run.sh installs them; LMGATE_REQUIRE_DISPLAY=1 makes a missing one a
failure), its icon in the tray, public through the fake ngrok agent, with an answer streaming
from the gateway's own port (the grace is for those: a tunnel's connections end with its
agent, which goes first).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PySide6.QtCore import SIGNAL, QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

from tests.fake_controller import FakeController
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import LMGATE, cli_env
from tests.stopping import PublicHome, Stream, public_home, running, wait_gone
from tray_app.control.service import SAME_STOP_SECONDS, StopRequests
from tray_app.ui import app as ui_app
from tray_app.ui.app import TrayApp
from tray_app.ui.stop_signals import STOP_SIGNALS, StopSignals

SIGNALS = [pytest.param(s, id=s.name) for s in STOP_SIGNALS]
# StopRequests' quiet time, scaled down for the tests in this process.
QUIET = 0.3
COMMIT_DATA = SIGNAL("commitDataRequest(QSessionManager&)")


@pytest.fixture
def app() -> QApplication:
    existing = QApplication.instance()
    return existing if isinstance(existing, QApplication) else QApplication([])


class Recorder:
    def __init__(self) -> None:
        self.orderly = 0
        self.orderly_at = 0.0
        self.at_once: list[int] = []
        self.loop: QEventLoop | None = None  # the loop a test spins, left when called

    def stop(self) -> None:
        self.orderly += 1
        self.orderly_at = time.monotonic()
        self._wake()

    def end(self, signum: int) -> None:
        self.at_once.append(signum)
        self._wake()

    def _wake(self) -> None:
        if self.loop is not None:
            self.loop.quit()


@pytest.fixture
def stop_signals(app: QApplication) -> Iterator[tuple[StopSignals, Recorder]]:
    recorder = Recorder()
    stopper = StopSignals(app, recorder.stop, recorder.end, StopRequests(QUIET))
    stopper.install()
    try:
        yield stopper, recorder
    finally:
        stopper.uninstall()


def spin(recorder: Recorder, seconds: float) -> None:
    """Spin Qt's event loop, in C++ (no Python runs unless Qt calls it), until ``recorder`` is
    called or ``seconds`` pass."""
    loop = QEventLoop()
    recorder.loop = loop
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()
    recorder.loop = None


def kill_soon(signum: int, after: float = 0.2) -> list[float]:
    """Send ``signum`` to this process from another thread; the list gets the time sent."""
    sent: list[float] = []

    def kill() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signum)

    threading.Timer(after, kill).start()
    return sent


class TestStopSignals:
    @pytest.mark.parametrize("signum", SIGNALS)
    def test_a_signal_wakes_the_event_loop_and_runs_the_orderly_stop_once(
        self, stop_signals: tuple[StopSignals, Recorder], signum: signal.Signals
    ) -> None:
        stopper, recorder = stop_signals
        sent = kill_soon(signum)
        spin(recorder, 5)
        assert recorder.orderly == 1
        took = recorder.orderly_at - sent[0]
        # Noticed by the wakeup socket, not by the next Python the loop happens to run.
        assert took < 0.5, f"the loop noticed {signum.name} only after {took:.1f} s"
        assert recorder.at_once == []
        assert stopper.stopping

    @pytest.mark.parametrize("signum", SIGNALS)
    def test_a_second_signal_ends_at_once_with_its_number(
        self, stop_signals: tuple[StopSignals, Recorder], signum: signal.Signals
    ) -> None:
        _stopper, recorder = stop_signals
        kill_soon(signal.SIGTERM)
        spin(recorder, 5)
        kill_soon(signum, after=QUIET + 0.2)
        spin(recorder, 5)
        assert recorder.at_once == [signum]
        assert recorder.orderly == 1

    def test_a_logouts_sigterm_and_sighup_together_are_one_stop(
        self, stop_signals: tuple[StopSignals, Recorder]
    ) -> None:
        """What systemd sends a session's processes at logout (SendSIGHUP=yes)."""
        _stopper, recorder = stop_signals
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        spin(recorder, 5)
        spin(recorder, QUIET + 0.2)
        assert recorder.orderly == 1
        assert recorder.at_once == []

    def test_the_same_signal_twice_in_a_row_ends_at_once(
        self, stop_signals: tuple[StopSignals, Recorder]
    ) -> None:
        """A person's quick second Ctrl-C means it."""
        _stopper, recorder = stop_signals
        kill_soon(signal.SIGINT)
        spin(recorder, 5)
        kill_soon(signal.SIGINT, after=0.05)
        spin(recorder, 5)
        assert recorder.at_once == [signal.SIGINT]

    def test_the_default_quiet_time_is_stop_requests(self, app: QApplication) -> None:
        stopper = StopSignals(app, Recorder().stop, Recorder().end)
        assert stopper._requests._window == SAME_STOP_SECONDS

    def test_a_signal_during_quit_from_the_menu_ends_at_once(
        self, stop_signals: tuple[StopSignals, Recorder]
    ) -> None:
        stopper, recorder = stop_signals
        assert stopper.mark_stopping()  # what TrayApp.quit does first
        assert not stopper.mark_stopping()
        kill_soon(signal.SIGHUP, after=QUIET + 0.2)
        spin(recorder, 5)
        assert recorder.at_once == [signal.SIGHUP]
        assert recorder.orderly == 0

    def test_a_signal_interrupts_python_waiting_in_the_main_thread(
        self, stop_signals: tuple[StopSignals, Recorder]
    ) -> None:
        """Quit's shutdown waits in the main thread for the loop thread: a second signal is
        handled during that wait, not after it."""
        stopper, recorder = stop_signals
        stopper.mark_stopping()
        never = threading.Event()
        kill_soon(signal.SIGTERM, after=QUIET + 0.2)
        started = time.monotonic()
        deadline = started + 5
        while not recorder.at_once and time.monotonic() < deadline:
            never.wait(1.0)
        assert recorder.at_once == [signal.SIGTERM]
        assert time.monotonic() - started < 1.5

    def test_the_session_ending_is_listened_to(self, app: QApplication) -> None:
        # Qt makes the QSessionManager it passes; Python cannot make one to emit the signal.
        before = app.receivers(COMMIT_DATA)
        recorder = Recorder()
        stopper = StopSignals(app, recorder.stop, recorder.end, StopRequests(QUIET))
        stopper.install()
        try:
            assert app.receivers(COMMIT_DATA) == before + 1
            stopper.session_ending()  # what that receiver runs
            spin(recorder, 5)
            assert recorder.orderly == 1 and stopper.stopping
        finally:
            stopper.uninstall()
        assert app.receivers(COMMIT_DATA) == before

    def test_a_stop_asked_twice_runs_the_orderly_stop_once(
        self, stop_signals: tuple[StopSignals, Recorder]
    ) -> None:
        stopper, recorder = stop_signals
        stopper.request_stop()
        stopper.request_stop()  # the session's end after a signal, or the other way round
        spin(recorder, 5)
        spin(recorder, 0.3)
        assert recorder.orderly == 1 and recorder.at_once == []

    def test_uninstall_gives_the_signals_back(self, app: QApplication) -> None:
        before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        recorder = Recorder()
        stopper = StopSignals(app, recorder.stop, recorder.end)
        stopper.install()
        assert all(signal.getsignal(s) == stopper._on_signal for s in STOP_SIGNALS)
        stopper.uninstall()
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
        assert signal.set_wakeup_fd(-1) == -1  # no wakeup socket left behind


# ---- the real tray ---------------------------------------------------------------------

TOOLS = ("Xvfb", "trayer")
GRACE = 6.0
SLACK = 8.0  # the agent's close, the database, Python's start and end


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("LMGATE_REQUIRE_DISPLAY") == "1":
            pytest.fail(f"missing for the display test: {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)} (tests/run.sh installs them)")


@dataclass
class Display:
    name: str
    xvfb: subprocess.Popen[bytes]


@pytest.fixture
def display() -> Iterator[Display]:
    """Xvfb with trayer as the tray host (as in test_ui_display.py)."""
    _require_tools()
    number = random.randint(200, 900)
    name = f":{number}"
    xvfb = subprocess.Popen(
        ["Xvfb", name, "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.05)
    trayer = subprocess.Popen(
        ["trayer", "--edge", "top", "--widthtype", "request", "--SetDockType", "true"],
        env={**os.environ, "DISPLAY": name},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        yield Display(name, xvfb)
    finally:
        for proc in (trayer, xvfb):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_tray(home: PublicHome, display: Display, tmp_path: Path) -> subprocess.Popen[str]:
    # Qt puts the single-instance socket in TMPDIR: this tray's own, so no other tray (a
    # person's, another test's) takes its wish.
    instance_dir = tmp_path / "tmp"
    instance_dir.mkdir()
    variables = {
        **home.vars,
        "DISPLAY": display.name,
        "QT_QPA_PLATFORM": "xcb",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "TMPDIR": str(instance_dir),
    }
    # stderr to a file, not a pipe: an agent left behind would hold a pipe open forever.
    with (tmp_path / "tray.err").open("w") as err:
        return subprocess.Popen(
            [LMGATE, "--go-public"], env=variables, stdout=subprocess.DEVNULL, stderr=err, text=True
        )


def public_tray(
    display: Display, tmp_path: Path, lmstudio: FakeLMStudio, *, chunks: int
) -> tuple[PublicHome, subprocess.Popen[str], int]:
    lmstudio.behaviour.chunks = chunks
    lmstudio.behaviour.chunk_delay = 0.25
    home = public_home(cli_env(tmp_path), tmp_path, lmstudio.url, grace=GRACE)
    tray = start_tray(home, display, tmp_path)
    home.wait_public(tray)
    assert_icon_in_the_tray(display, tray)
    return home, tray, home.agent_pid()


def _windows(display: Display, *query: str) -> list[str]:
    found = subprocess.run(
        ["xdotool", "search", "--onlyvisible", *query],
        env={**os.environ, "DISPLAY": display.name},
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.split()


def _geometry(display: Display, window: str) -> tuple[int, int, int, int]:
    shown = subprocess.run(
        ["xdotool", "getwindowgeometry", "--shell", window],
        env={**os.environ, "DISPLAY": display.name},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split("=", 1) for line in shown.split())
    return int(values["X"]), int(values["Y"]), int(values["WIDTH"]), int(values["HEIGHT"])


def assert_icon_in_the_tray(display: Display, tray: subprocess.Popen[str]) -> None:
    """The tray's icon is embedded in trayer's panel, not the window shown where there is no
    tray host: the icon's window lies inside the panel's."""
    deadline = time.monotonic() + 10
    while True:
        panels = [_geometry(display, w) for w in _windows(display, "--class", "trayer")]
        icons = [_geometry(display, w) for w in _windows(display, "--classname", "lmgate")]
        inside = [
            icon
            for icon in icons
            for panel in panels
            if panel[0] <= icon[0]
            and icon[0] + icon[2] <= panel[0] + panel[2]
            and panel[1] <= icon[1]
            and icon[1] + icon[3] <= panel[1] + panel[3]
        ]
        if inside:
            break
        assert tray.poll() is None, f"the tray ended ({tray.returncode})"
        assert time.monotonic() < deadline, f"no icon in the tray: {icons} vs panels {panels}"
        time.sleep(0.2)
    assert not _windows(display, "--name", "^LM Gate$"), "the window fallback is shown"


def leave_nothing_running(tray: subprocess.Popen[str], agent: int) -> None:
    """After a failure too: a tray or agent left running would hold the next test's ports."""
    if tray.poll() is None:
        tray.kill()
        tray.wait()
    if running(agent):
        os.kill(agent, signal.SIGKILL)


def ended(
    proc: subprocess.Popen[str], seconds: float, tmp_path: Path, agent: int, agent_within: float = 5
) -> str:
    """What the tray said on stderr, once it ended within ``seconds`` and its agent within
    ``agent_within`` more (checked here, before the cleanup would kill a left one)."""
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds:g} s after the signal") from None
    assert wait_gone(agent, agent_within), f"the agent (pid {agent}) outlived the tray"
    return (tmp_path / "tray.err").read_text()


@pytest.mark.display
@pytest.mark.parametrize("signum", SIGNALS)
def test_a_stop_signal_runs_quit_and_leaves_no_agent(
    signum: signal.Signals, display: Display, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    home, tray, agent = public_tray(display, tmp_path, lmstudio_thread, chunks=8)  # 2 s
    try:
        stream = Stream(home.local_url, home.key).start()
        tray.send_signal(signum)
        err = ended(tray, GRACE + SLACK, tmp_path, agent)
    finally:
        leave_nothing_running(tray, agent)
    assert tray.returncode == 0, err
    assert wait_gone(agent), f"the agent (pid {agent}) outlived the tray"
    stream.join()
    assert stream.finished or stream.ended_with_error, stream.events[-3:]
    requests, completion_tokens = home.usage()["streamer"]
    assert requests == 1 and completion_tokens > 0
    assert not list((tmp_path / "tmp").glob("lmgate-*")), "the single-instance socket is left"


@pytest.mark.display
def test_a_second_signal_ends_the_tray_at_once_and_still_no_agent(
    display: Display, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    home, tray, agent = public_tray(display, tmp_path, lmstudio_thread, chunks=80)  # 20 s
    try:
        stream = Stream(home.local_url, home.key).start()
        tray.send_signal(signal.SIGTERM)
        # The orderly stop is under way, waiting for the answer; past the quiet time, so the
        # next signal is a second stop, not part of the first.
        time.sleep(SAME_STOP_SECONDS + 0.2)
        assert tray.poll() is None
        started = time.monotonic()
        tray.send_signal(signal.SIGINT)
        err = ended(tray, 5, tmp_path, agent, agent_within=1)
        took = time.monotonic() - started
    finally:
        leave_nothing_running(tray, agent)
    assert tray.returncode == 128 + signal.SIGINT, err
    assert took < 3, f"the second signal took {took:.1f} s"
    assert not running(agent), f"the agent (pid {agent}) outlived the tray"
    stream.join(10)
    assert not stream.finished  # cut short: that is what a second signal asks for


def assert_stopped_in_order(
    home: PublicHome, tray: subprocess.Popen[str], agent: int, stream: Stream, err: str
) -> None:
    assert tray.returncode == 0, err
    assert wait_gone(agent), f"the agent (pid {agent}) outlived the tray"
    stream.join()
    assert stream.finished or stream.ended_with_error, stream.events[-3:]
    requests, completion_tokens = home.usage()["streamer"]
    assert requests == 1
    # LM Studio counts the tokens in its last event: an answer cut off has none to record.
    assert completion_tokens > 0 or not stream.finished


@pytest.mark.display
def test_a_logouts_sigterm_and_sighup_together_are_one_orderly_stop(
    display: Display, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    """systemd stops a session's processes with SIGTERM and at once SIGHUP (and SIGCONT)."""
    home, tray, agent = public_tray(display, tmp_path, lmstudio_thread, chunks=8)  # 2 s
    try:
        stream = Stream(home.local_url, home.key).start()
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCONT):
            os.kill(tray.pid, signum)
        err = ended(tray, GRACE + SLACK, tmp_path, agent)
    finally:
        leave_nothing_running(tray, agent)
    assert "ending at once" not in err
    assert_stopped_in_order(home, tray, agent, stream, err)
    assert stream.finished, stream.events[-3:]


@pytest.mark.display
def test_an_answer_longer_than_the_grace_ends_with_the_sse_error(
    display: Display, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    home, tray, agent = public_tray(display, tmp_path, lmstudio_thread, chunks=80)  # 20 s
    try:
        stream = Stream(home.local_url, home.key).start()
        started = time.monotonic()
        tray.send_signal(signal.SIGTERM)
        err = ended(tray, GRACE + SLACK, tmp_path, agent)
        took = time.monotonic() - started
    finally:
        leave_nothing_running(tray, agent)
    assert_stopped_in_order(home, tray, agent, stream, err)
    assert stream.ended_with_error and not stream.finished, stream.events[-3:]
    assert took >= GRACE - 0.5, f"the grace was cut short: ended after {took:.1f} s"


@pytest.mark.display
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_stop_while_the_tunnel_opens_closes_it(
    signum: signal.Signals, display: Display, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    home = public_home(cli_env(tmp_path), tmp_path, lmstudio_thread.url, grace=GRACE)
    home.vars["FAKE_NGROK_START_DELAY"] = "3"  # the agent runs, its tunnel not yet open
    tray = start_tray(home, display, tmp_path)
    agent = home.agent_pid()
    try:
        time.sleep(0.5)
        tray.send_signal(signum)
        err = ended(tray, GRACE + SLACK + 3, tmp_path, agent)
    finally:
        leave_nothing_running(tray, agent)
    assert tray.returncode == 0, err
    assert wait_gone(agent), f"the agent (pid {agent}) outlived the tray"
    left = sorted(p.name for p in (tmp_path / "data" / "ngrok").iterdir())
    assert left == [], f"left behind: {left}"


class FailingShutdown(FakeController):
    """A controller whose shutdown fails part way."""

    def shutdown(self, timeout: float = 30.0) -> None:
        super().shutdown(timeout)
        raise RuntimeError("the loop thread did not stop within 0 s")


class ExitRecorder:
    """Stands for the QApplication: records how it was told to end (running the real one's
    exec here would leave it closing for every later test in this process)."""

    def __init__(self) -> None:
        self.codes: list[int] = []

    def instance(self) -> ExitRecorder:
        return self

    def quit(self) -> None:
        self.codes.append(0)

    def exit(self, code: int) -> None:
        self.codes.append(code)


def test_quit_exits_even_when_the_shutdown_fails(
    app: QApplication, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FailingShutdown()
    tray_app = TrayApp(fake, instance=f"lmgate-test-failing-{id(fake)}")
    recorder = ExitRecorder()
    monkeypatch.setattr(ui_app, "QApplication", recorder)
    with caplog.at_level(logging.ERROR, logger="lmgate.ui"):
        tray_app.quit()  # the old quit raised here, before telling the app to exit
    assert recorder.codes == [1]
    assert ("shutdown", ()) in fake.calls
    assert not tray_app.stopped_in_order
    assert "the shutdown failed part way" in caplog.text


def test_quit_after_a_clean_shutdown_exits_0(
    app: QApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeController()
    tray_app = TrayApp(fake, instance=f"lmgate-test-clean-{id(fake)}")
    recorder = ExitRecorder()
    monkeypatch.setattr(ui_app, "QApplication", recorder)
    tray_app.quit()
    tray_app.quit()  # again: nothing more
    assert recorder.codes == [0]
    assert tray_app.stopped_in_order
