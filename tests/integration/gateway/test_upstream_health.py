"""The health checker against real servers on 127.0.0.1: probes, backoff, rejoin, wake-up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.fake_lmstudio import Behaviour, FakeLMStudio
from tests.fakes import FakeClock
from tray_app.clock import SystemClock
from tray_app.gateway.upstream.health import HealthChecker, ProbeResult, lmstudio_probe
from tray_app.gateway.upstream.pool import BACKOFF_FIRST, Upstream, UpstreamPool, UpstreamSpec


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as s:
        yield s


async def started(behaviour: Behaviour | None = None) -> FakeLMStudio:
    fake = FakeLMStudio(behaviour)
    await fake.start()
    return fake


class TestRealProbe:
    async def test_lmstudio_reports_models_and_loaded(self, session: aiohttp.ClientSession) -> None:
        fake = await started(Behaviour(models=("a", "b")))
        fake.loaded = ["a"]
        try:
            pool = UpstreamPool([UpstreamSpec("desk", fake.url)], FakeClock())
            await HealthChecker(
                pool, lmstudio_probe(session, lambda _: None), FakeClock()
            ).check_all()
            (view,) = pool.views()
            assert view.state == "up"
            assert view.loaded == ("a",)
            assert set(view.models) >= {"a"}
        finally:
            await fake.stop()

    async def test_server_without_native_api_is_up_with_loaded_unknown(
        self, session: aiohttp.ClientSession
    ) -> None:
        fake = await started(Behaviour(models=("a",), native_api=False))
        try:
            pool = UpstreamPool([UpstreamSpec("llama", fake.url)], FakeClock())
            await HealthChecker(
                pool, lmstudio_probe(session, lambda _: None), FakeClock()
            ).check_all()
            upstream = pool.get("llama")
            assert upstream is not None
            assert upstream.up is True and upstream.loaded is None
            assert upstream.models == frozenset({"a"})
        finally:
            await fake.stop()

    async def test_each_upstream_gets_its_own_token(self, session: aiohttp.ClientSession) -> None:
        one = await started(Behaviour(require_token="tok-one"))
        two = await started(Behaviour(require_token="tok-two"))
        three = await started(Behaviour(require_token="tok-three"))
        tokens = {"one": "tok-one", "two": "wrong"}
        try:
            pool = UpstreamPool(
                [
                    UpstreamSpec("one", one.url),
                    UpstreamSpec("two", two.url),
                    UpstreamSpec("three", three.url),
                ],
                FakeClock(),
            )
            await HealthChecker(pool, lmstudio_probe(session, tokens.get), FakeClock()).check_all()
            states = {v.name: (v.state, v.down_reason) for v in pool.views()}
            assert states["one"] == ("up", None)
            assert states["two"] == ("down", "it refused LM Gate's token (401)")
            assert states["three"] == (
                "down",
                "it wants an API token (401) and none is stored: "
                "`lmgate secret set upstream-token-three`",
            )
            sent = {r.headers.get("Authorization") for r in one.received + one.native}
            assert sent == {"Bearer tok-one"}  # never the other upstream's token
        finally:
            for fake in (one, two, three):
                await fake.stop()

    async def test_nothing_listening_is_down_in_words(self, session: aiohttp.ClientSession) -> None:
        pool = UpstreamPool(
            [UpstreamSpec("gone", f"http://127.0.0.1:{closed_port()}")], FakeClock()
        )
        await HealthChecker(pool, lmstudio_probe(session, lambda _: None), FakeClock()).check_all()
        (view,) = pool.views()
        assert view.state == "down" and view.down_reason

    async def test_error_status_is_down(self, session: aiohttp.ClientSession) -> None:
        async with answering({"/v1/models": 503}) as url:
            pool = UpstreamPool([UpstreamSpec("desk", url)], FakeClock())
            await HealthChecker(
                pool, lmstudio_probe(session, lambda _: None), FakeClock()
            ).check_all()
            (view,) = pool.views()
            assert (view.state, view.down_reason) == ("down", "it answered 503")

    async def test_a_failing_native_api_leaves_it_up_with_loaded_unknown(
        self, session: aiohttp.ClientSession
    ) -> None:
        async with answering({"/v1/models": 200, "/api/v0/models": 500}) as url:
            pool = UpstreamPool([UpstreamSpec("desk", url)], FakeClock())
            await HealthChecker(
                pool, lmstudio_probe(session, lambda _: None), FakeClock()
            ).check_all()
            (view,) = pool.views()
            assert (view.state, view.models, view.loaded) == ("up", ("m",), ())
            upstream = pool.get("desk")
            assert upstream is not None and upstream.loaded is None


@contextlib.asynccontextmanager
async def answering(statuses: dict[str, int]) -> AsyncIterator[str]:
    """A server answering each path with its status (a one-model list when 200)."""

    async def answer(request: web.Request) -> web.Response:
        status = statuses[request.path]
        body = {"data": [{"id": "m"}]} if status == 200 else {"error": "no"}
        return web.json_response(body, status=status)

    app = web.Application()
    for path in statuses:
        app.router.add_get(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class TestChecker:
    async def test_failed_upstream_rejoins_after_its_backoff(self) -> None:
        clock = FakeClock()
        answers: dict[str, ProbeResult] = {"a": ProbeResult(failure="refused")}
        asked: list[str] = []

        async def probe(upstream: Upstream) -> ProbeResult:
            asked.append(upstream.name)
            return answers[upstream.name]

        pool = UpstreamPool([UpstreamSpec("a", "http://127.0.0.1:1")], clock)
        checker = HealthChecker(pool, probe, clock)
        await checker.check_due()
        upstream = pool.get("a")
        assert upstream is not None and upstream.up is False
        await checker.check_due()  # not due yet: not asked again
        assert asked == ["a"]
        answers["a"] = ProbeResult(models=("m",))
        clock.advance(BACKOFF_FIRST)
        await checker.check_due()
        assert asked == ["a", "a"]
        assert upstream.up is True and upstream.models == frozenset({"m"})

    async def test_a_probe_that_never_ends_is_cut_off_and_holds_up_no_other(self) -> None:
        clock = FakeClock()

        async def probe(upstream: Upstream) -> ProbeResult:
            if upstream.name == "dribbling":
                await asyncio.sleep(3600)
            return ProbeResult(models=("m",))

        pool = UpstreamPool(
            [
                UpstreamSpec("dribbling", "http://127.0.0.1:1"),
                UpstreamSpec("fine", "http://127.0.0.1:2"),
            ],
            clock,
        )
        checker = HealthChecker(pool, probe, clock, probe_deadline=0.1)
        await asyncio.wait_for(checker.check_due(), 2)
        states = {view.name: (view.state, view.down_reason) for view in pool.views()}
        assert states == {
            "dribbling": ("down", "it did not answer within 0.1 s"),
            "fine": ("up", None),
        }

    async def test_a_slow_machine_delays_no_other_s_probes(self) -> None:
        asked: list[str] = []

        async def probe(upstream: Upstream) -> ProbeResult:
            asked.append(upstream.name)
            if upstream.name == "slow":
                await asyncio.sleep(30)  # under way for the whole test
            return ProbeResult(failure="refused")  # "quick" fails: retried after 1, 2 s

        clock = SystemClock()
        pool = UpstreamPool(
            [
                UpstreamSpec("slow", "http://127.0.0.1:1"),
                UpstreamSpec("quick", "http://127.0.0.1:2"),
            ],
            clock,
        )
        task = asyncio.create_task(HealthChecker(pool, probe, clock, probe_deadline=60).run())
        try:
            await asyncio.sleep(BACKOFF_FIRST + 0.5)
            # Not waiting for slow's answer: quick was asked again after its first backoff.
            assert asked.count("quick") == 2 and asked.count("slow") == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def test_a_probe_that_raises_marks_down_and_the_checker_lives(self) -> None:
        clock = FakeClock()

        async def probe(upstream: Upstream) -> ProbeResult:
            raise RuntimeError("boom")

        pool = UpstreamPool([UpstreamSpec("a", "http://127.0.0.1:1")], clock)
        checker = HealthChecker(pool, probe, clock)
        await checker.check_due()
        (view,) = pool.views()
        assert view.state == "down" and view.down_reason == "the probe failed: RuntimeError"
        assert checker.rounds == 1

    async def test_suspect_wakes_the_running_checker(self) -> None:
        answered = asyncio.Event()

        async def probe(upstream: Upstream) -> ProbeResult:
            answered.set()
            return ProbeResult(models=("m",))

        clock = SystemClock()
        pool = UpstreamPool([UpstreamSpec("a", "http://127.0.0.1:1")], clock)
        checker = HealthChecker(pool, probe, clock)
        task = asyncio.create_task(checker.run())
        try:
            await asyncio.wait_for(answered.wait(), 5)
            answered.clear()
            upstream = pool.get("a")
            assert upstream is not None and upstream.up is True
            checker.suspect(upstream, "connection refused")
            assert upstream.up is False
            # Probed again after the first backoff, long before the healthy interval.
            await asyncio.wait_for(answered.wait(), BACKOFF_FIRST + 3)
            assert upstream.up is True
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def test_a_slow_upstream_does_not_delay_the_others(self) -> None:
        clock = FakeClock()
        release = asyncio.Event()

        async def probe(upstream: Upstream) -> ProbeResult:
            if upstream.name == "slow":
                await release.wait()
            return ProbeResult(models=("m",))

        pool = UpstreamPool(
            [
                UpstreamSpec("slow", "http://127.0.0.1:1"),
                UpstreamSpec("fast", "http://127.0.0.1:2"),
            ],
            clock,
        )
        checker = HealthChecker(pool, probe, clock)
        round_ = asyncio.create_task(checker.check_due())
        for _ in range(20):
            await asyncio.sleep(0)
        fast = pool.get("fast")
        assert fast is not None and fast.up is True
        release.set()
        await round_
