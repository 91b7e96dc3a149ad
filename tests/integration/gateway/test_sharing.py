"""Sharing one GPU through the whole gateway, over real sockets: token budgets at their edge
with many parallel streams and across a restart, the fair queue's waiting (its place told to a
stream, a bounded wait, a caller that gives up), and the model guard between two callers of
two models. The parts have their own unit tests; these prove the gateway wires them in order
(budget, then model, then slot) and gives back what a request took, however it ended."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import sse_events
from tray_app.config.settings import ModelSwitch
from tray_app.storage.audit import AuditSource
from tray_app.storage.budgets import NO_BUDGET, Budget, BudgetStore
from tray_app.storage.usage_history import UsageHistory, day_start

QWEN, LLAMA = MODELS[0], MODELS[1]
CHAT = "/v1/chat/completions"
# 18 characters: an estimate of ceil(18 / 4) + 4 = 9 prompt tokens; the fake reports 7.
QUESTION = [{"role": "user", "content": "hello there friend"}]
ESTIMATE, PROMPT = 9, 7


def key_with_budget(rig: IdentityRig, name: str, budget: Budget | None = None) -> str:
    return rig.identity.api_keys.create(
        name, scopes=frozenset({"chat", "models"}), budget=budget or NO_BUDGET
    )[0]


async def chat(
    session: aiohttp.ClientSession,
    rig: IdentityRig,
    key: str,
    *,
    stream: bool = True,
    model: str = QWEN,
    **fields: Any,
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        rig.url + CHAT,
        json={"model": model, "messages": QUESTION, "stream": stream, **fields},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, dict(response.headers), await response.read()


def answers_slowly(fake: FakeLMStudio, chunks: int, delay: float) -> None:
    fake.behaviour.chunks = chunks
    fake.behaviour.chunk_delay = delay


async def occupying(
    session: aiohttp.ClientSession, rig: IdentityRig, key: str, **fields: Any
) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
    """A stream started and given time to take its slot (or its model), still running."""
    running = asyncio.ensure_future(chat(session, rig, key, **fields))
    await asyncio.sleep(0.1)
    return running


async def until(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


def principal_of(rig: IdentityRig, name: str) -> str:
    (key,) = [k for k in rig.identity.api_keys.list() if k.name == name]
    return key.principal_name


class TestBudgetsAtTheirEdge:
    async def test_a_burst_of_parallel_streams_never_overshoots(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        # Each stream reserves its estimate + its cap (9 + 10) and uses 7 + 10: 52 of 100 fit
        # in 1,000 at once, whatever order they arrive in.
        answers_slowly(fake_lmstudio, 10, 0.01)
        rig = await start_identity_gateway(
            limits_concurrent_requests=100,
            limits_requests_per_minute=10_000,
            queue_generations_in_flight=100,
            queue_max_waiting_per_client=200,
            server_max_connections_per_client=200,
        )
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=1000))
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(chat(session, rig, key, max_tokens=10) for _ in range(100))
            )
            statuses = [status for status, _, _ in answers]
            assert statuses.count(200) == 52 and statuses.count(429) == 48
            refused = next(a for a in answers if a[0] == 429)
            assert b'"budget_exceeded"' in refused[2] and int(refused[1]["Retry-After"]) >= 1
            assert b"resets at" in refused[2] and b" UTC" in refused[2]
            for status, _, body in answers:
                if status == 200:
                    assert sse_events(body)[-1] == "[DONE]"
            # Settled: 52 x 17 = 884 used, 116 left; one at a time 6 more fit (6 x 19 = 114).
            served = 0
            while (await chat(session, rig, key, max_tokens=10))[0] == 200:
                served += 1
            assert served == 6
        rig.identity.recorder.flush()
        used = UsageHistory(rig.identity.db).totals_since(
            principal_of(rig, "friend"), day_start(time.time())
        )
        assert used.tokens == 58 * (PROMPT + 10) == 986 <= 1000
        assert used.requests == 58 + 48 + 1  # refusals are requests too, at no tokens

    async def test_the_budget_survives_a_restart(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio, tmp_path: Path
    ) -> None:
        fake_lmstudio.behaviour.chunks = 10
        data = str(tmp_path / "kept")
        first = await start_identity_gateway(storage_data_dir=data)
        key = key_with_budget(first, "friend", Budget(tokens_per_day=45))
        async with aiohttp.ClientSession() as session:
            assert (await chat(session, first, key, max_tokens=10))[0] == 200  # 17 used
            assert (await chat(session, first, key, max_tokens=10))[0] == 200  # 34 used
            await first.server.stop()  # flushes the usage
            again = await start_identity_gateway(storage_data_dir=data)
            status, _, body = await chat(session, again, key, max_tokens=10)
            assert (status, error_code(body)) == (
                429,
                "budget_exceeded",
            ) and b"11 of your 45" in body
            # What is left still serves a request that fits in it (9 + 2).
            assert (await chat(session, again, key, max_tokens=2))[0] == 200

    async def test_a_request_without_a_cap_gets_one_that_fits(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "friend", Budget(tokens_per_month=30))
        async with aiohttp.ClientSession() as session:
            assert (await chat(session, rig, key, stream=False))[0] == 200
        sent = fake_lmstudio.received[-1].json()
        assert sent["max_tokens"] == 30 - ESTIMATE

    async def test_a_budget_set_while_serving_applies_to_the_next_request(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "friend")
        async with aiohttp.ClientSession() as session:
            assert (await chat(session, rig, key, max_tokens=10))[0] == 200
            BudgetStore(rig.identity.db).set(
                principal_of(rig, "friend"),
                Budget(tokens_per_day=5),
                now=time.time(),
                source=AuditSource.CLI,
            )
            rig.identity.authenticator.reload_budgets()
            status, _, body = await chat(session, rig, key, max_tokens=10)
            assert (status, error_code(body)) == (429, "budget_exceeded")

    async def test_a_caller_without_a_budget_is_not_counted_against_one(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        limited = key_with_budget(rig, "limited", Budget(tokens_per_day=20))
        free = key_with_budget(rig, "free")
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                assert (await chat(session, rig, free, max_tokens=10))[0] == 200
            assert (await chat(session, rig, limited, max_tokens=10))[0] == 200


class TestWhatAnAnswerCutShortCosts:
    async def test_hanging_up_mid_answer_still_pays_for_it(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio, 50, 0.02)
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "quitter", Budget(tokens_per_day=1000))
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                rig.url + CHAT,
                json={"model": QWEN, "messages": QUESTION, "stream": True, "max_tokens": 50},
                headers={"Authorization": f"Bearer {key}"},
            )
            for _ in range(5):
                await response.content.readany()
            response.close()
            await asyncio.sleep(0.3)
        rig.identity.recorder.flush()
        used = UsageHistory(rig.identity.db).totals_since(
            principal_of(rig, "quitter"), day_start(time.time())
        )
        assert ESTIMATE <= used.tokens <= ESTIMATE + 50

    async def test_a_wait_that_ends_refused_costs_nothing(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio, 50, 0.05)
        rig = await start_identity_gateway(queue_generations_in_flight=1, queue_max_stream_wait=0.3)
        busy = key_with_budget(rig, "busy")
        waiting = key_with_budget(rig, "waiting", Budget(tokens_per_day=1000))
        async with aiohttp.ClientSession() as session:
            first = await occupying(session, rig, busy)
            status, _, body = await chat(session, rig, waiting, max_tokens=10)
            first.cancel()
        assert status == 200 and b'"code": "queue_timeout"' in body  # told its place first
        rig.identity.recorder.flush()
        used = UsageHistory(rig.identity.db).totals_since(
            principal_of(rig, "waiting"), day_start(time.time())
        )
        assert used.tokens == 0


class TestTheQueue:
    async def test_a_waiting_stream_is_told_its_place_then_answered(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio, 20, 0.02)
        rig = await start_identity_gateway(queue_generations_in_flight=1)
        busy, waiting = key_with_budget(rig, "busy"), key_with_budget(rig, "waiting")
        async with aiohttp.ClientSession() as session:
            first = await occupying(session, rig, busy)
            status, headers, body = await chat(session, rig, waiting)
            assert (await first)[0] == 200
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        assert body.startswith(b": waiting, 0 ahead\n\n")
        assert sse_events(body)[-1] == "[DONE]"

    async def test_a_plain_request_waits_no_longer_than_queue_max_wait(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio, 50, 0.05)
        rig = await start_identity_gateway(queue_generations_in_flight=1, queue_max_wait=0.3)
        busy, waiting = key_with_budget(rig, "busy"), key_with_budget(rig, "waiting")
        async with aiohttp.ClientSession() as session:
            first = await occupying(session, rig, busy)
            started = time.monotonic()
            status, headers, body = await chat(session, rig, waiting, stream=False)
            waited = time.monotonic() - started
            first.cancel()
        assert (status, error_code(body)) == (503, "queue_timeout")
        assert 0.3 <= waited < 1.5 and 1 <= int(headers["Retry-After"]) <= 5

    async def test_a_caller_that_gives_up_leaves_the_queue_at_once(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio, 100, 0.05)
        rig = await start_identity_gateway(queue_generations_in_flight=1)
        busy, waiting = key_with_budget(rig, "busy"), key_with_budget(rig, "waiting")
        queue = rig.server.gateway.queue
        async with aiohttp.ClientSession() as session:
            first = await occupying(session, rig, busy)
            gives_up = asyncio.ensure_future(chat(session, rig, waiting))
            await until(lambda: queue.waiting == 1)
            gives_up.cancel()
            await until(lambda: queue.waiting == 0)
            assert queue.busy == 1
            first.cancel()
            await until(lambda: queue.busy == 0)  # a stream whose client left gives its slot back

    async def test_one_address_cannot_fill_the_queue(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio, 40, 0.05)
        rig = await start_identity_gateway(
            queue_generations_in_flight=1,
            queue_max_waiting_per_client=2,
            limits_concurrent_requests=10,
        )
        key = key_with_budget(rig, "flood")
        async with aiohttp.ClientSession() as session:
            running = [asyncio.ensure_future(chat(session, rig, key)) for _ in range(3)]
            await asyncio.sleep(0.3)  # one runs, two wait: the address's share
            status, headers, body = await chat(session, rig, key, stream=False)
            for task in running:
                task.cancel()
        assert (status, error_code(body)) == (429, "queue_full") and "Retry-After" in headers

    async def test_one_credential_cannot_fill_the_queue(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        # The address's share is roomy here: the credential's own bound is what refuses.
        answers_slowly(fake_lmstudio, 40, 0.05)
        rig = await start_identity_gateway(
            queue_generations_in_flight=1,
            queue_max_waiting_per_client=10,
            queue_max_waiting_per_caller=2,
            limits_concurrent_requests=10,
        )
        key, other = key_with_budget(rig, "flood"), key_with_budget(rig, "other")
        queue = rig.server.gateway.queue
        async with aiohttp.ClientSession() as session:
            running = [asyncio.ensure_future(chat(session, rig, key)) for _ in range(3)]
            await until(lambda: queue.waiting == 2)  # one runs, two wait: the key's share
            status, headers, body = await chat(session, rig, key, stream=False)
            running.append(asyncio.ensure_future(chat(session, rig, other)))
            await until(lambda: queue.waiting == 3)  # another key still may wait
            for task in running:
                task.cancel()
        assert (status, error_code(body)) == (429, "queue_full") and "Retry-After" in headers

    async def test_a_heavy_caller_does_not_starve_a_light_one(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        # One slot; the heavy caller keeps 8 queued, the light one asks again each time it is
        # answered: round-robin serves it every other turn, not after the whole backlog.
        answers_slowly(fake_lmstudio, 3, 0.02)
        rig = await start_identity_gateway(
            queue_generations_in_flight=1,
            limits_concurrent_requests=8,
            limits_requests_per_minute=10_000,
        )
        heavy, light = key_with_budget(rig, "heavy"), key_with_budget(rig, "light")
        order: list[str] = []
        async with aiohttp.ClientSession() as session:

            async def keep_asking(key: str, who: str, times: int) -> None:
                for _ in range(times):
                    assert (await chat(session, rig, key, stream=False))[0] == 200
                    order.append(who)

            await asyncio.gather(
                *(keep_asking(heavy, "heavy", 3) for _ in range(8)), keep_asking(light, "light", 6)
            )
        first_twelve = order[:12]
        assert first_twelve.count("light") >= 5, order


class TestTheModelGuard:
    async def test_another_model_s_first_request_waits_for_a_running_answer(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        answers_slowly(fake_lmstudio, 20, 0.02)
        fake_lmstudio.behaviour.load_delay = 0.1
        rig = await start_identity_gateway()
        reader, switcher = key_with_budget(rig, "reader"), key_with_budget(rig, "switcher")
        async with aiohttp.ClientSession() as session:
            running = await occupying(session, rig, reader, model=QWEN)
            status, _, body = await chat(session, rig, switcher, model=LLAMA)
            first_status, _, first_body = await running
        assert (first_status, sse_events(first_body)[-1]) == (200, "[DONE]")
        assert not fake_lmstudio.streams_cut, "no answer was evicted mid-stream"
        assert status == 200 and b": waiting for another model's answers to finish" in body
        assert fake_lmstudio.loads[LLAMA] == 1 and fake_lmstudio.loaded == [LLAMA]

    async def test_requests_waiting_for_a_model_count_against_the_queue(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        answers_slowly(fake_lmstudio, 30, 0.03)
        rig = await start_identity_gateway(queue_max_waiting_per_caller=1)
        reader, switcher = key_with_budget(rig, "reader"), key_with_budget(rig, "switcher")
        async with aiohttp.ClientSession() as session:
            running = await occupying(session, rig, reader, model=QWEN)
            waiting = await occupying(session, rig, switcher, model=LLAMA)
            assert rig.server.gateway.queue.waiting == 0  # it waits in the guard, not the queue
            status, _, body = await chat(session, rig, switcher, model=LLAMA, stream=False)
            assert (status, error_code(body)) == (429, "queue_full")
            assert (await running)[0] == 200 and (await waiting)[0] == 200
        assert fake_lmstudio.loads[LLAMA] == 1 and not fake_lmstudio.streams_cut

    async def test_concurrent_first_requests_load_the_model_once(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.load_delay = 0.2
        rig = await start_identity_gateway()
        keys = [key_with_budget(rig, f"caller{i}") for i in range(6)]
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(chat(session, rig, k, model=LLAMA, stream=False) for k in keys)
            )
        assert [status for status, _, _ in answers] == [200] * 6
        assert fake_lmstudio.loads[LLAMA] == 1

    async def test_refuse_policy_answers_503_while_others_generate(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        answers_slowly(fake_lmstudio, 30, 0.02)
        rig = await start_identity_gateway(models_switch=ModelSwitch.REFUSE)
        reader, switcher = key_with_budget(rig, "reader"), key_with_budget(rig, "switcher")
        async with aiohttp.ClientSession() as session:
            running = await occupying(session, rig, reader, model=QWEN)
            status, headers, body = await chat(session, rig, switcher, model=LLAMA, stream=False)
            await running
        assert (status, error_code(body)) == (503, "model_busy") and "Retry-After" in headers
        assert fake_lmstudio.loads[LLAMA] == 0 and not fake_lmstudio.streams_cut

    async def test_warm_up_loads_a_model_before_anyone_asks(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.load_delay = 0.05
        rig = await start_identity_gateway()
        assert await rig.server.gateway.warm_up(LLAMA) >= 0.05
        assert fake_lmstudio.loaded == [LLAMA]
        assert await rig.server.gateway.warm_up(LLAMA) == 0.0


@pytest.mark.parametrize("switch", ["wait", "off"])
async def test_the_guard_never_answers_a_caller_with_model_states(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio, switch: str
) -> None:
    """What the guard reads from LM Studio's native API is the gateway's own: a caller's
    /api/v0/models is refused as ever, and nothing it forwards carries model states."""
    fake_lmstudio.loaded = [QWEN]
    rig = await start_identity_gateway(models_switch=ModelSwitch(switch))
    key = key_with_budget(rig, "caller")
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, rig, key, stream=False))[0] == 200
        async with session.get(
            rig.url + "/api/v0/models", headers={"Authorization": f"Bearer {key}"}
        ) as response:
            body = await response.read()
            assert (response.status, error_code(body)) == (404, "path_not_allowed")
            assert b"not-loaded" not in body
    assert all(not r.path.startswith("/api/") for r in fake_lmstudio.received)


async def test_prometheus_shows_the_queue_and_the_budgets_without_a_label_per_caller(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    answers_slowly(fake_lmstudio, 40, 0.03)
    rig = await start_identity_gateway(queue_generations_in_flight=1)
    runner = key_with_budget(rig, "runner", Budget(tokens_per_day=1000))
    waiter, broke = key_with_budget(rig, "waiter"), key_with_budget(rig, "broke", Budget(1))
    scraper = rig.identity.api_keys.create("prometheus", scopes=frozenset({"metrics"}))[0]
    async with aiohttp.ClientSession() as session:
        running = await occupying(session, rig, runner, max_tokens=40)
        waiting = await occupying(session, rig, waiter)
        assert (await chat(session, rig, broke, max_tokens=5))[0] == 429
        async with session.get(
            rig.url + "/metrics", headers={"Authorization": f"Bearer {scraper}"}
        ) as response:
            text = (await response.text()).splitlines()
        await asyncio.gather(running, waiting)
    assert "lmgate_queue_waiting 1.0" in text
    assert "lmgate_generations_in_flight 1.0" in text
    assert f"lmgate_budget_reserved_tokens {ESTIMATE + 40}.0" in text
    assert "lmgate_budget_callers 2.0" in text
    assert 'lmgate_rate_limited_total{limit="budget_exceeded"} 1.0' in text
    assert not any("runner" in line or "key:" in line for line in text)
