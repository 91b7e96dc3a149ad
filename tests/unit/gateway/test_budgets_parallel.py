"""Many parallel streams against one budget at its edge, over a real database that a flush
thread writes to meanwhile: never more admitted than fits, and the totals exact, also after
a restart."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fakes import FakeClock
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.budgets import BudgetLedger, Reservation
from tray_app.gateway.upstream.usage import Usage, usage_from_payload
from tray_app.identity.principal import SCOPE_CHAT, Budget, Principal
from tray_app.storage.database import Database
from tray_app.storage.usage_history import UsageHistory

NAME = "key:k1"
STREAMS = 200
PROMPT = 10


async def stream(request: web.Request) -> web.StreamResponse:
    """An SSE stream of ``tokens`` one-token chunks, then its usage (as LM Studio ends one)."""
    tokens = int(request.query["tokens"])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(tokens):
        await response.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
        await asyncio.sleep(0)
    usage = {"usage": {"prompt_tokens": PROMPT, "completion_tokens": tokens}}
    await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    return response


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/stream"
    await runner.cleanup()


@dataclass
class Rig:
    db: Database
    clock: FakeClock
    recorder: UsageRecorder
    ledger: BudgetLedger
    admitted: list[Reservation] = field(default_factory=list)
    used: int = 0

    def new_ledger(self) -> BudgetLedger:
        return BudgetLedger(UsageHistory(self.db), self.clock, pending=self.recorder.pending_tokens)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    db = Database(tmp_path / "lmgate.db")
    clock = FakeClock()
    recorder = UsageRecorder(db, clock)
    yield Rig(
        db, clock, recorder, BudgetLedger(UsageHistory(db), clock, pending=recorder.pending_tokens)
    )
    db.close()


def last_usage(body: bytes) -> Usage | None:
    for line in reversed(body.decode().splitlines()):
        if line.startswith("data: {") and '"usage"' in line:
            return usage_from_payload(json.loads(line[6:]))
    return None


async def one_stream(
    rig: Rig, session: aiohttp.ClientSession, url: str, who: Principal, wanted: int | None
) -> bool:
    """One request as the gateway runs it: reserve, stream, settle and record in one step."""
    try:
        reservation = rig.ledger.reserve(who, prompt_estimate=PROMPT, requested_output=wanted)
    except ApiError as error:
        assert error.code == "budget_exceeded"
        return False
    assert reservation is not None and who.budget is not None
    used, in_flight = status(rig.ledger, who.budget)
    limits = (who.budget.tokens_per_day, who.budget.tokens_per_month)
    assert used + in_flight <= min(limit for limit in limits if limit is not None)
    rig.admitted.append(reservation)
    cap = wanted if wanted is not None else reservation.max_output
    assert cap is not None and cap >= 1
    tokens = random.randint(0, min(cap, 40))
    async with session.get(url, params={"tokens": str(tokens)}) as response:
        usage = last_usage(await response.read())
    assert usage == Usage(PROMPT, tokens)
    rig.ledger.settle(reservation, usage)
    rig.recorder.record(who.name, usage)
    rig.used += usage.prompt_tokens + usage.completion_tokens
    return True


async def flush_meanwhile(rig: Rig, stop: asyncio.Event) -> None:
    while not stop.is_set():
        assert await asyncio.to_thread(rig.recorder.flush)
        await asyncio.sleep(0.001)


def status(ledger: BudgetLedger, budget: Budget) -> tuple[int, int]:
    now = ledger.status(NAME, budget)
    return now.day_used, now.in_flight


class TestParallelStreams:
    async def test_a_burst_is_admitted_exactly_as_far_as_it_fits(
        self, rig: Rig, server: str
    ) -> None:
        # Each stream reserves PROMPT + 40; the budget holds 37 of them and 39 tokens more.
        budget = Budget(tokens_per_day=37 * 50 + 39)
        who = Principal(NAME, frozenset({SCOPE_CHAT}), budget=budget)
        start = asyncio.Event()

        async def after_start(session: aiohttp.ClientSession) -> bool:
            await start.wait()
            return await one_stream(rig, session, server, who, 40)

        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(after_start(session)) for _ in range(STREAMS)]
            await asyncio.sleep(0)
            start.set()
            results = await asyncio.gather(*tasks)
        assert sum(results) == 37
        assert status(rig.ledger, budget) == (rig.used, 0)

    async def test_streams_coming_and_going_never_overshoot(self, rig: Rig, server: str) -> None:
        budget = Budget(tokens_per_day=3000, tokens_per_month=2500)
        who = Principal(NAME, frozenset({SCOPE_CHAT}), budget=budget)
        stop = asyncio.Event()
        flusher = asyncio.create_task(flush_meanwhile(rig, stop))

        async def waves(session: aiohttp.ClientSession, index: int) -> bool:
            await asyncio.sleep(random.random() / 50)
            wanted = None if index % 3 == 0 else random.randint(1, 60)
            return await one_stream(rig, session, server, who, wanted)

        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(waves(session, i) for i in range(STREAMS)))
        stop.set()
        await flusher
        assert 0 < sum(results) < STREAMS
        assert rig.used <= 2500
        assert status(rig.ledger, budget) == (rig.used, 0)
        assert rig.recorder.flush()
        assert UsageHistory(rig.db).totals_since(NAME, 0).tokens == rig.used
        assert status(rig.new_ledger(), budget) == (rig.used, 0)

    async def test_after_a_restart_the_edge_is_where_it_was(self, rig: Rig, server: str) -> None:
        budget = Budget(tokens_per_day=1000)
        who = Principal(NAME, frozenset({SCOPE_CHAT}), budget=budget)
        async with aiohttp.ClientSession() as session:
            first = await asyncio.gather(
                *(one_stream(rig, session, server, who, 40) for _ in range(STREAMS))
            )
            assert rig.recorder.flush()
            used_before = rig.used
            rig.recorder = UsageRecorder(rig.db, rig.clock)
            rig.ledger = rig.new_ledger()
            assert status(rig.ledger, budget) == (used_before, 0)
            second = await asyncio.gather(
                *(one_stream(rig, session, server, who, 40) for _ in range(STREAMS))
            )
        assert sum(first) == 20  # reserved at once, each PROMPT + 40
        assert rig.used <= 1000
        left = 1000 - used_before
        assert sum(second) == left // 50
        assert status(rig.ledger, budget) == (rig.used, 0)
