"""Budgets shared by replicas in a real Redis: two ledgers (each with its own SharedLimits) on
one redis-server and one database are two replicas of a team's gateway. A budget holds across
them exactly, on both sides of its edge, however the requests interleave; a crashed replica's
reservations free themselves; the counters start from the database and start again from it
when they may have missed a settle."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock
from tests.redis_server import RedisServer
from tray_app.config.parsers import WhenRedisIsDown
from tray_app.config.settings import Config
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.body_rules import prepare_body
from tray_app.gateway.budgets import SHARED_FRESH_SECONDS, BudgetLedger
from tray_app.gateway.fair_queue import FairQueue
from tray_app.gateway.routes import FORWARDED_ROUTES
from tray_app.gateway.shared_budgets import PREFIX, SharedBudgets
from tray_app.gateway.shared_limits import SharedLimits
from tray_app.gateway.sharing import Generation, Sharing
from tray_app.gateway.state_calls import StateCalls
from tray_app.gateway.token_estimate import estimate_prompt_tokens
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import SCOPE_CHAT, Budget, Principal
from tray_app.storage.database import Database
from tray_app.storage.usage_history import UsageHistory

LEASE = 0.6  # seconds: small, so a crashed replica's reservations expire within a test
NAME = "key:alice"
START = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC).timestamp()
CHAT = next(r for r in FORWARDED_ROUTES if r.path == "/v1/chat/completions")
PROMPT = '"messages":[{"role":"user","content":"Hi"}]'


def caller(day: int | None = None, month: int | None = None) -> Principal:
    return Principal(NAME, frozenset({SCOPE_CHAT}), budget=Budget(day, month))


@dataclass
class Replica:
    limits: SharedLimits
    ledger: BudgetLedger
    recorder: UsageRecorder
    sharing: Sharing

    async def ask(self, who: Principal, max_tokens: int) -> Generation:
        body = json.dumps({"model": "m", "max_tokens": max_tokens}).encode()
        raw = body[:-1] + b"," + PROMPT.encode() + b"}"
        return await self.sharing.admit(who, "203.0.113.9", CHAT, prepare_body(CHAT, raw))

    def finish(self, generation: Generation, used: Usage | None) -> None:
        """Settle and record in one step, as the gateway does when a request ends."""
        self.recorder.record(NAME, generation.settle(used, 0, reached=True))

    def counts(self, who: Principal) -> tuple[int, int]:
        assert who.budget is not None
        status = self.ledger.status(NAME, who.budget)
        return status.day_used, status.in_flight


Replicas = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "lmgate.db")
    yield database
    database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def replicas(
    redis_server: RedisServer, db: Database, clock: FakeClock
) -> AsyncIterator[Replicas]:
    opened: list[SharedLimits] = []

    async def make(count: int = 2, **overrides: Any) -> list[Replica]:
        config = Config(state_lease_seconds=LEASE, **overrides)
        made = []
        for _ in range(count):
            limits = SharedLimits(config, redis_server.url)
            await limits.open()
            opened.append(limits)
            recorder = UsageRecorder(db, clock)
            ledger = BudgetLedger(UsageHistory(db), clock, pending=recorder.pending_tokens)
            ledger.shared = SharedBudgets(limits)
            queue = FairQueue(
                slots=64,
                per_caller=64,
                max_waiting=64,
                max_waiting_per_client=64,
                max_waiting_per_caller=64,
            )
            sharing = Sharing(
                queue, guard=None, ledger=ledger, max_wait=5, max_stream_wait=5, state=StateCalls(
                    offload=False
                )
            )  # fmt: skip
            made.append(Replica(limits, ledger, recorder, sharing))
        return made

    yield make
    for limits in opened:
        await limits.close()


async def refusal(call: Awaitable[object]) -> ApiError | None:
    try:
        await call
    except ApiError as err:
        return err
    return None


PROMPT_TOKENS = estimate_prompt_tokens(json.loads("{" + PROMPT + "}"))


async def test_what_one_replica_reserves_and_uses_the_other_counts(
    replicas: Replicas,
) -> None:
    a, b = await replicas()
    who = caller(day=1000)
    held = await a.ask(who, 600 - PROMPT_TOKENS)
    assert a.counts(who) == (0, 600)
    # The other replica sees A's reservation: 600 more do not fit, 400 do, 401 do not.
    err = await refusal(b.ask(who, 600 - PROMPT_TOKENS))
    assert err is not None and err.code == "budget_exceeded" and err.status == 429
    err = await refusal(b.ask(who, 401 - PROMPT_TOKENS))
    assert err is not None and err.code == "budget_exceeded"
    last = await b.ask(who, 400 - PROMPT_TOKENS)
    assert b.counts(who) == (0, 1000)
    # A's request used 100 of its 600: B sees the 500 given back once it is settled.
    a.finish(held, Usage(PROMPT_TOKENS, 100 - PROMPT_TOKENS))
    await asyncio.sleep(0.05)  # the settle goes to Redis in the background
    b.finish(last, Usage(PROMPT_TOKENS, 0))
    await asyncio.sleep(0.05)
    left = 1000 - 100 - PROMPT_TOKENS
    await b.ask(who, left - PROMPT_TOKENS)
    assert b.counts(who) == (100 + PROMPT_TOKENS, left)


async def test_parallel_requests_on_two_replicas_get_exactly_the_budget(
    replicas: Replicas,
) -> None:
    a, b, c = await replicas(3)
    # Each asks 100 (PROMPT_TOKENS + 91); the budget holds 10 of them and 99 tokens more.
    who = caller(day=1099)
    sides = [a, b, c]
    results = await asyncio.gather(
        *(sides[n % 3].ask(who, 100 - PROMPT_TOKENS) for n in range(40)), return_exceptions=True
    )
    codes = Counter(r.code if isinstance(r, ApiError) else "admitted" for r in results)
    assert codes == {"admitted": 10, "budget_exceeded": 30}
    # Every replica sees the same 1000 reserved; one more of 99 fits, not of 100.
    assert {side.counts(who)[1] for side in sides} == {1000}
    assert (await refusal(a.ask(who, 100 - PROMPT_TOKENS))) is not None
    await b.ask(who, 99 - PROMPT_TOKENS)


async def test_a_month_and_a_day_both_hold_and_the_tighter_one_refuses(
    replicas: Replicas,
) -> None:
    a, b = await replicas()
    who = caller(day=5000, month=300)
    first = await a.ask(who, 200 - PROMPT_TOKENS)
    err = await refusal(b.ask(who, 101 - PROMPT_TOKENS))
    assert err is not None and "month" in err.message
    await b.ask(who, 100 - PROMPT_TOKENS)
    a.finish(first, Usage(PROMPT_TOKENS, 200 - PROMPT_TOKENS))
    await asyncio.sleep(0.05)
    assert b.counts(who)[1] in (100, 300)  # as last read; Redis has the settle


async def test_the_counters_start_from_the_database(
    replicas: Replicas, db: Database, clock: FakeClock
) -> None:
    stored = UsageRecorder(db, clock)
    stored.record(NAME, Usage(300, 400))  # an earlier process's use today, flushed
    assert stored.flush()
    a, b = await replicas()
    who = caller(day=1000)
    err = await refusal(a.ask(who, 301 - PROMPT_TOKENS))
    assert err is not None and err.code == "budget_exceeded"
    await b.ask(who, 300 - PROMPT_TOKENS)
    assert b.counts(who) == (700, 300)


async def test_what_a_replica_has_not_flushed_yet_counts_when_it_starts_a_counter(
    replicas: Replicas,
) -> None:
    (a,) = await replicas(1)
    a.recorder.record(NAME, Usage(500, 0))  # counted, not flushed
    who = caller(day=1000)
    await a.ask(who, 500 - PROMPT_TOKENS)
    assert (await refusal(a.ask(who, 1))) is not None


async def test_a_crashed_replica_s_reservations_free_themselves_a_live_one_s_do_not(
    replicas: Replicas,
) -> None:
    live, crashing, other = await replicas(3)
    who = caller(day=1000)
    await live.ask(who, 300 - PROMPT_TOKENS)
    await crashing.ask(who, 700 - PROMPT_TOKENS)
    await crashing.limits.close()  # no renewal, no settle: as if the process died
    assert (await refusal(other.ask(who, 1))) is not None
    started = time.monotonic()
    await asyncio.sleep(LEASE * 2.5)
    await other.ask(who, 700 - PROMPT_TOKENS)  # the crashed one's 700 are free again
    assert time.monotonic() - started < LEASE * 4
    # The live replica's 300 are still held.
    assert (await refusal(other.ask(who, 1))) is not None


async def test_a_settle_redis_did_not_hear_makes_the_counters_start_again(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = await replicas()
    who = caller(day=1000)
    generation = await a.ask(who, 400 - PROMPT_TOKENS)
    # The settle fails in Redis before it changes anything, as one lost on the way would.
    redis = redis_server.client()
    held = f"{PREFIX}{NAME}:held"
    redis.delete(held)
    redis.set(held, "not a sorted set")
    a.finish(generation, Usage(PROMPT_TOKENS, 400 - PROMPT_TOKENS))  # 400 used
    await asyncio.sleep(0.05)
    redis.delete(held)
    assert a.recorder.flush()  # the database has the 400
    assert a.limits.available  # one script Redis refused is not an outage
    # Redis still counts 0 used: A starts its counter again from the database.
    await a.ask(who, 600 - PROMPT_TOKENS)
    assert a.counts(who) == (400, 600)
    assert (await refusal(b.ask(who, 1))) is not None


async def test_a_budget_lifted_drops_the_counters_and_given_back_starts_from_the_database(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    (a,) = await replicas(1)
    who = caller(day=1000)
    a.finish(await a.ask(who, 100 - PROMPT_TOKENS), Usage(PROMPT_TOKENS, 100 - PROMPT_TOKENS))
    await asyncio.sleep(0.05)
    assert redis_server.client().keys(PREFIX + "*day*")
    unbudgeted = Principal(NAME, frozenset({SCOPE_CHAT}))
    a.finish(await a.ask(unbudgeted, 500), Usage(200, 300))  # 500 used without a budget
    await asyncio.sleep(0.05)
    assert redis_server.client().keys(PREFIX + "*day*") == []
    assert a.recorder.flush()
    await a.ask(who, 400 - PROMPT_TOKENS)  # 100 + 500 used: 400 left, all of it
    assert a.counts(who) == (600, 400)


async def test_redis_down_closed_refuses_a_budgeted_request_and_open_lets_it_count_here(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    (closed,) = await replicas(1)
    (opened,) = await replicas(1, state_when_redis_is_down=WhenRedisIsDown.OPEN)
    who = caller(day=1000)
    redis_server.stop()
    err = await refusal(closed.ask(who, 100))
    assert err is not None and err.status == 503 and err.code == "shared_limits_unavailable"
    # Open: this replica's own ledger decides, as on one machine; the budget still holds here.
    await opened.ask(who, 900 - PROMPT_TOKENS)
    err = await refusal(opened.ask(who, 101 - PROMPT_TOKENS))
    assert err is not None and err.code == "budget_exceeded"


async def test_counts_a_moment_old_cost_one_call_and_a_refusal_on_them_is_asked_again(
    replicas: Replicas, redis_server: RedisServer, clock: FakeClock
) -> None:
    a, b = await replicas()
    who = caller(day=1000)
    redis = redis_server.client()

    def scripts_run() -> int:
        return int(redis.info("commandstats")["cmdstat_evalsha"]["calls"])

    b.finish(await b.ask(who, 10), Usage(PROMPT_TOKENS, 0))
    held = await a.ask(who, 900 - PROMPT_TOKENS)
    await asyncio.sleep(0.05)  # B's settle, in the background, is done
    before = scripts_run()
    await b.ask(who, 50 - PROMPT_TOKENS)  # B's counts are from its last answer: not read again
    assert scripts_run() - before == 1
    # A gives its 900 back; B's counts (a moment old) still hold them: refused on those, B
    # reads again and is admitted.
    a.finish(held, Usage(PROMPT_TOKENS, 0))
    await asyncio.sleep(0.05)
    await b.ask(who, 800 - PROMPT_TOKENS)
    # Older than SHARED_FRESH_SECONDS, counts are read before anything is decided.
    clock.advance(SHARED_FRESH_SECONDS)
    before = scripts_run()
    err = await refusal(b.ask(who, 200))
    assert err is not None and err.code == "budget_exceeded"
    assert scripts_run() - before == 1  # the read; the refusal needed no second


async def test_a_caller_that_hangs_up_while_redis_takes_its_reservation_holds_nothing(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    (a,) = await replicas(1)
    who = caller(day=1000)
    a.finish(await a.ask(who, 10), Usage(PROMPT_TOKENS, 0))  # counts read: the next one
    await asyncio.sleep(0.05)  # goes straight to the reservation
    redis_server.pause()
    try:
        asking = asyncio.ensure_future(a.ask(who, 900 - PROMPT_TOKENS))
        await asyncio.sleep(0.1)
        asking.cancel()
    finally:
        redis_server.resume()
    with pytest.raises(asyncio.CancelledError):
        await asking
    await asyncio.sleep(0.3)
    assert a.counts(who)[1] == 0  # nothing held here ...
    assert redis_server.client().zcard(f"{PREFIX}{NAME}:held") == 0  # ... nor in Redis
    await a.ask(who, 900 - PROMPT_TOKENS)


async def test_use_served_while_cut_off_from_redis_counts_once_it_is_back(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    """Open policy: a replica that lost Redis for a moment held the budget alone; what it
    served then is not in Redis's counters, which it starts again from the database."""
    (a,) = await replicas(1, state_when_redis_is_down=WhenRedisIsDown.OPEN)
    who = caller(day=1000)
    a.finish(await a.ask(who, 100 - PROMPT_TOKENS), Usage(PROMPT_TOKENS, 100 - PROMPT_TOKENS))
    await asyncio.sleep(0.05)
    redis_server.pause()
    try:
        clock_moves = a.ledger._clock
        assert isinstance(clock_moves, FakeClock)
        clock_moves.advance(SHARED_FRESH_SECONDS)  # the counts are read again: no answer
        generation = await a.ask(who, 300 - PROMPT_TOKENS)  # admitted here alone
        a.finish(generation, Usage(PROMPT_TOKENS, 300 - PROMPT_TOKENS))
    finally:
        redis_server.resume()
    assert a.recorder.flush()  # the database has 100 + 300
    while not a.limits.available:
        await asyncio.sleep(0.05)
    err = await refusal(a.ask(who, 601 - PROMPT_TOKENS))  # Redis alone would count 100
    assert err is not None and err.code == "budget_exceeded"
    await a.ask(who, 600 - PROMPT_TOKENS)


async def test_a_reservation_redis_lost_is_put_back_by_the_replica_holding_it(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = await replicas()
    who = caller(day=1000)
    await a.ask(who, 900 - PROMPT_TOKENS)
    redis_server.client().delete(f"{PREFIX}{NAME}:held")  # as after a restart of Redis
    await asyncio.sleep(LEASE)  # a renewal or two later
    assert (await refusal(b.ask(who, 101))) is not None
