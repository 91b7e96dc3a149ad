"""A tunnel lost soon after each open keeps backing off across its short-lived successes (an
agent that dies after every open must not make a new quick tunnel, and a new URL, every few
seconds); one that stayed up long enough starts over at once."""

from __future__ import annotations

import asyncio
import time

from tests.fakes import FakeTunnelProvider
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus


async def always_works(url: str) -> bool:
    return True


async def reopen_times(stable_after: float, losses: int) -> list[float]:
    """Seconds from each loss to the tunnel being public again."""
    provider = FakeTunnelProvider(url="https://x.example")
    public = asyncio.Event()

    def seen(status: TunnelStatus) -> None:
        if status.state is TunnelState.PUBLIC:
            public.set()

    manager = TunnelManager(
        provider,
        1,
        on_change=seen,
        checker=always_works,
        health_interval=600,
        backoff_start=0.2,
        backoff_max=1.0,
        stable_after=stable_after,
    )
    await manager.start()
    took = []
    try:
        for _ in range(losses):
            public.clear()
            lost_at = time.monotonic()
            provider.lose("the agent exited (code 1)")
            await asyncio.wait_for(public.wait(), 10)
            took.append(time.monotonic() - lost_at)
    finally:
        await manager.stop()
    return took


async def test_losses_right_after_each_open_wait_longer_each_time() -> None:
    took = await reopen_times(stable_after=60.0, losses=4)
    assert took[0] >= 0.2 and took[1] >= 0.4 and took[2] >= 0.8, took
    assert 0.9 <= took[3] < 1.6, took  # capped at backoff_max


async def test_a_tunnel_that_stayed_up_reopens_at_once() -> None:
    took = await reopen_times(stable_after=0.0, losses=3)
    assert all(t < 0.15 for t in took), took
