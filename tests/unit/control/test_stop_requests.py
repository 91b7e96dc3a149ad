"""What a stop signal asks for (the rule the tray and `serve` share), and how long Quit waits
for the orderly shutdown: derived from the settings, so a long grace is never cut short."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tray_app.config.settings import Config
from tray_app.control import controller as controller_module
from tray_app.control.controller import ThreadedController, shutdown_timeout
from tray_app.control.service import SAME_STOP_SECONDS, StopKind, StopRequests
from tray_app.tunnel.ngrok import CLOSE_TIMEOUT


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_logouts_sigterm_then_sighup_is_one_stop(clock: Clock) -> None:
    requests = StopRequests(clock=clock)
    assert requests.signal(signal.SIGTERM) is StopKind.ORDERLY
    clock.now += 0.005
    assert requests.signal(signal.SIGHUP) is StopKind.SAME_STOP
    assert requests.signal(signal.SIGINT) is StopKind.SAME_STOP
    assert requests.stopping


def test_the_same_signal_again_ends_at_once_however_soon(clock: Clock) -> None:
    requests = StopRequests(clock=clock)
    assert requests.signal(signal.SIGINT) is StopKind.ORDERLY
    clock.now += 0.1  # a person's quick second Ctrl-C
    assert requests.signal(signal.SIGINT) is StopKind.AT_ONCE


def test_after_the_quiet_time_any_signal_ends_at_once(clock: Clock) -> None:
    requests = StopRequests(clock=clock)
    requests.signal(signal.SIGTERM)
    clock.now += SAME_STOP_SECONDS
    assert requests.signal(signal.SIGHUP) is StopKind.AT_ONCE


def test_a_part_of_the_first_stop_counts_as_seen(clock: Clock) -> None:
    requests = StopRequests(clock=clock)
    requests.signal(signal.SIGTERM)
    assert requests.signal(signal.SIGHUP) is StopKind.SAME_STOP
    assert requests.signal(signal.SIGHUP) is StopKind.AT_ONCE


def test_a_stop_begun_without_a_signal_takes_the_signals_that_come_with_it(
    clock: Clock,
) -> None:
    requests = StopRequests(clock=clock)
    assert not requests.stopping
    assert requests.begin()
    assert not requests.begin()
    assert requests.signal(signal.SIGTERM) is StopKind.SAME_STOP
    clock.now += SAME_STOP_SECONDS
    assert requests.signal(signal.SIGHUP) is StopKind.AT_ONCE


def test_quit_waits_for_the_grace_the_owner_set_plus_the_tunnels_own_bounds() -> None:
    short = shutdown_timeout(Config(server_shutdown_grace=5.0))
    long = shutdown_timeout(Config(server_shutdown_grace=3600.0))
    assert long - short == 3595.0
    # The old fixed 30 s cut any grace above it short.
    assert short >= 5.0 + CLOSE_TIMEOUT + controller_module.OPENING_WAIT


class SlowShutdown:
    """Just what ThreadedController.shutdown uses of a Controller: its settings, and a
    shutdown that takes ``seconds``."""

    def __init__(self, grace: float, seconds: float) -> None:
        self.config = Config(server_shutdown_grace=grace)
        self.seconds = seconds
        self.finished = False

    async def shutdown(self) -> None:
        await asyncio.sleep(self.seconds)
        self.finished = True


def threaded(fake: SlowShutdown) -> ThreadedController:
    controller = ThreadedController(fake)  # type: ignore[arg-type]
    controller._thread.start()
    return controller


@pytest.mark.parametrize(("grace", "seconds", "finishes"), [(1.5, 1.0, True), (0.5, 2.0, False)])
def test_the_shutdowns_wait_follows_the_grace(
    monkeypatch: pytest.MonkeyPatch, grace: float, seconds: float, finishes: bool
) -> None:
    """The fixed bounds scaled to nothing, the wait is the grace: a shutdown within it is
    waited for to its end, a longer one given up on at it (the old code waited 30 s)."""
    monkeypatch.setattr(controller_module, "OPENING_WAIT", 0.0)
    monkeypatch.setattr(controller_module, "CLOSE_TIMEOUT", 0.0)
    monkeypatch.setattr(controller_module, "SHUTDOWN_SLACK", 0.0)
    fake = SlowShutdown(grace, seconds)
    controller = threaded(fake)
    started = time.monotonic()
    controller.shutdown()
    took = time.monotonic() - started
    assert fake.finished is finishes
    assert took < (seconds if finishes else grace) + 0.5, f"took {took:.1f} s"
    if not finishes:
        assert took >= grace
