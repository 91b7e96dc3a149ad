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


async def test_fake_tunnel_provider_opens_fails_and_loses() -> None:
    from tests.fakes import FakeTunnelProvider
    from tray_app.errors import TunnelError

    provider = FakeTunnelProvider(fail_opens=1)
    lost: list[str] = []
    provider.set_lost_callback(lost.append)
    with pytest.raises(TunnelError):
        await provider.open(1234)
    assert await provider.open(1234) == "http://127.0.0.1:1234"
    assert await provider.alive()
    provider.lose("gone")
    assert lost == ["gone"] and not await provider.alive()
    await provider.close()
    assert (provider.opens, provider.closes) == (2, 1)
