import pytest

from tests.fakes import FakeClock
from tray_app.clock import Clock


def test_fake_clock_moves_only_when_told() -> None:
    clock: Clock = FakeClock(100.0)
    assert clock.time() == 100.0
    start = clock.monotonic()
    assert clock.monotonic() == start
    assert isinstance(clock, FakeClock)
    clock.advance(2.5)
    assert clock.time() == 102.5
    assert clock.monotonic() == start + 2.5


def test_fake_clock_refuses_to_go_back() -> None:
    with pytest.raises(ValueError, match="backwards"):
        FakeClock().advance(-1)
