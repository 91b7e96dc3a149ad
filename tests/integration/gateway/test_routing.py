"""The router through real sockets: a refused connection is retried once elsewhere, a failure
after the request went out is not, busy counts and stickiness follow what was answered."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.fake_lmstudio import Behaviour, FakeLMStudio
from tests.fakes import FakeClock
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.health import HealthChecker, ProbeResult
from tray_app.gateway.upstream.pool import BACKOFF_FIRST, Upstream, UpstreamPool, UpstreamSpec
from tray_app.gateway.upstream.routing import STICKY_MAX, Router

QUESTION = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeLMStudio]]:
    started = [FakeLMStudio(Behaviour(models=("m",))) for _ in range(2)]
    for fake in started:
        await fake.start()
    yield started
    for fake in started:
        await fake.stop()


def sender(session: aiohttp.ClientSession, sent: list[str]) -> Callable[[Upstream], Awaitable[int]]:
    async def send(upstream: Upstream) -> int:
        sent.append(upstream.name)
        async with session.post(
            upstream.spec.url + "/v1/chat/completions", json=QUESTION
        ) as response:
            await response.read()
            return response.status

    return send


class TestRetryBeforeTheFirstByte:
    async def test_a_refused_connection_goes_to_the_other_once(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("gone", closed_url(), weight=9), UpstreamSpec("desk", fakes[0].url)],
            FakeClock(),
        )
        router = Router(pool)
        sent: list[str] = []
        upstream, status = await router.send("key:a", "m", sender(session, sent))
        assert (upstream.name, status, sent) == ("desk", 200, ["gone", "desk"])
        assert router.retries == 1
        gone = pool.get("gone")
        assert gone is not None and gone.up is False and gone.down_reason
        assert upstream.in_flight == 1 and gone.in_flight == 0
        router.done(upstream)
        assert upstream.in_flight == 0
        assert len(fakes[0].received) == 1  # the answer ran once

    async def test_a_burst_refused_by_a_server_that_went_away_counts_as_one_failure(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        clock = FakeClock()
        pool = UpstreamPool(
            [UpstreamSpec("gone", closed_url(), weight=9), UpstreamSpec("desk", fakes[0].url)],
            clock,
        )
        router = Router(pool, health=HealthChecker(pool, self.never_probed, clock))
        sent: list[str] = []
        answers = await asyncio.gather(
            *(router.send(f"key:{n}", "m", sender(session, sent)) for n in range(8))
        )
        assert [(u.name, status) for u, status in answers] == [("desk", 200)] * 8
        gone = pool.get("gone")
        assert gone is not None and gone.up is False
        # Back within the first backoff, not pushed out to the longest one.
        assert (gone.failures, gone.next_probe) == (1, clock.monotonic() + BACKOFF_FIRST)

    @staticmethod
    async def never_probed(upstream: Upstream) -> ProbeResult:
        raise AssertionError("only the checker's own run probes")

    async def test_no_other_upstream_raises_the_connect_failure(
        self, session: aiohttp.ClientSession
    ) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("one", closed_url()), UpstreamSpec("two", closed_url())], FakeClock()
        )
        router = Router(pool)
        sent: list[str] = []
        with pytest.raises(aiohttp.ClientConnectorError):
            await router.send("key:a", "m", sender(session, sent))
        assert sorted(sent) == ["one", "two"]  # once each, never a third time
        assert all(u.up is False and u.in_flight == 0 for u in pool)
        with pytest.raises(ApiError) as caught:
            await router.send("key:a", "m", sender(session, sent))
        assert (caught.value.status, caught.value.code) == (503, "upstream_unreachable")

    async def test_a_failure_after_the_request_went_out_is_not_retried(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        fakes[0].behaviour.header_delay = 5  # it has the request; the client gives up
        pool = UpstreamPool(
            [UpstreamSpec("slow", fakes[0].url, weight=9), UpstreamSpec("desk", fakes[1].url)],
            FakeClock(),
        )
        router = Router(pool)
        sent: list[str] = []

        async def send(upstream: Upstream) -> int:
            sent.append(upstream.name)
            async with session.post(
                upstream.spec.url + "/v1/chat/completions",
                json=QUESTION,
                timeout=aiohttp.ClientTimeout(sock_read=0.2),
            ) as response:
                return response.status

        with pytest.raises(TimeoutError):
            await router.send("key:a", "m", send)
        assert sent == ["slow"] and fakes[1].received == []
        slow = pool.get("slow")
        assert slow is not None and slow.in_flight == 0 and slow.up is not False

    async def test_one_upstream_is_tried_once(self, session: aiohttp.ClientSession) -> None:
        pool = UpstreamPool([UpstreamSpec("only", closed_url())], FakeClock())
        sent: list[str] = []
        clock = FakeClock()
        checker = HealthChecker(pool, TestRetryBeforeTheFirstByte.never_probed, clock)
        with pytest.raises(aiohttp.ClientConnectorError):
            await Router(pool, health=checker).send("key:a", "m", sender(session, sent))
        assert sent == ["only"]
        only = pool.get("only")
        # Not marked down: the one upstream is asked again next time, whatever happened.
        assert only is not None and only.up is None and only.failures == 0

    async def test_a_cancelled_request_is_not_counted_busy(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        fakes[0].behaviour.header_delay = 5
        pool = UpstreamPool([UpstreamSpec("desk", fakes[0].url)], FakeClock())
        task = asyncio.create_task(Router(pool).send("key:a", "m", sender(session, [])))
        while not fakes[0].received:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        desk = pool.get("desk")
        assert desk is not None and desk.in_flight == 0


class TestStickiness:
    async def test_a_conversation_stays_where_it_was_answered(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("a", fakes[0].url), UpstreamSpec("b", fakes[1].url)], FakeClock()
        )
        router = Router(pool)
        sent: list[str] = []
        first, _ = await router.send("key:x", "m", sender(session, sent))
        # a keeps one in flight: a new caller goes to b, the same caller stays on a
        other, _ = await router.send("key:y", "m", sender(session, sent))
        again, _ = await router.send("key:x", "m", sender(session, sent))
        assert (first.name, other.name, again.name) == ("a", "b", "a")

    async def test_it_moves_when_its_upstream_fails(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("a", fakes[0].url), UpstreamSpec("b", fakes[1].url)], FakeClock()
        )
        router = Router(pool)
        first, _ = await router.send("key:x", "m", sender(session, []))
        router.done(first)
        pool.failed("a", "refused")
        moved, _ = await router.send("key:x", "m", sender(session, []))
        router.done(moved)
        pool.answered("a", models=["m"])
        kept, _ = await router.send("key:x", "m", sender(session, []))
        assert (first.name, moved.name, kept.name) == ("a", "b", "b")

    async def test_remembered_pairs_are_bounded(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("a", fakes[0].url), UpstreamSpec("b", fakes[1].url)], FakeClock()
        )
        router = Router(pool)

        async def send(upstream: Upstream) -> None:
            return None

        for n in range(STICKY_MAX + 50):
            upstream, _ = await router.send(f"key:{n}", "m", send)
            router.done(upstream)
        assert len(router._sticky) == STICKY_MAX
        assert ("key:0", "m") not in router._sticky

    async def test_a_conversation_in_use_does_not_age_out_as_if_idle(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("a", fakes[0].url), UpstreamSpec("b", fakes[1].url, weight=5)],
            FakeClock(),
        )
        router = Router(pool)
        pool.failed("b", "away for a moment")
        first, _ = await router.send("key:busy", "m", sender(session, []))
        router.done(first)
        assert first.name == "a"
        # b is back, and preferred by weight: only stickiness keeps the conversation on a.
        pool.answered("a", models=["m"])
        pool.answered("b", models=["m"])
        for n in range(STICKY_MAX + 50):
            # The busy caller's every turn answered by the same upstream, between the others'.
            upstream, _ = await router.send("key:busy", "m", _answered)
            router.done(upstream)
            assert upstream.name == first.name
            other, _ = await router.send(f"key:{n}", "m", _answered)
            router.done(other)
        assert router._sticky.get(("key:busy", "m")) == first.name

    async def test_a_retry_that_fails_later_is_not_counted_busy(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        fakes[0].behaviour.header_delay = 5
        pool = UpstreamPool(
            [UpstreamSpec("gone", closed_url(), weight=9), UpstreamSpec("slow", fakes[0].url)],
            FakeClock(),
        )

        async def send(upstream: Upstream) -> int:
            async with session.post(
                upstream.spec.url + "/v1/chat/completions",
                json=QUESTION,
                timeout=aiohttp.ClientTimeout(sock_read=0.2),
            ) as response:
                return response.status

        with pytest.raises(TimeoutError):
            await Router(pool).send("key:a", "m", send)
        assert [u.in_flight for u in pool] == [0, 0]


class TestHealthTold:
    async def test_a_refused_connection_wakes_the_checker(
        self, session: aiohttp.ClientSession, fakes: list[FakeLMStudio]
    ) -> None:
        clock = FakeClock()
        pool = UpstreamPool(
            [UpstreamSpec("gone", closed_url(), weight=9), UpstreamSpec("desk", fakes[0].url)],
            clock,
        )
        probed: list[str] = []

        async def probe(upstream: Upstream) -> ProbeResult:
            probed.append(upstream.name)
            return ProbeResult(failure="refused")

        health = HealthChecker(pool, probe, clock)
        await Router(pool, health=health).send("key:a", "m", sender(session, []))
        gone = pool.get("gone")
        assert gone is not None and gone.up is False
        assert health._wake.is_set()


async def _answered(upstream: Upstream) -> None:
    return None
