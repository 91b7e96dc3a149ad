"""The sharing gate on its own, with the real ledger (over a real database) and the real fair
queue: which output cap a generation carries, what it reserves, and that everything it took
is given back once. The model guard in front of the queue is the real one too, over LM
Studio's model API in memory. The whole path through the gateway is in the integration test
of the same name."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock
from tests.memory_model_api import A, B, C, MemoryModelApi
from tray_app.config.settings import ModelSwitch
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.body_rules import prepare_body
from tray_app.gateway.budgets import BudgetLedger
from tray_app.gateway.fair_queue import FairQueue
from tray_app.gateway.routes import FORWARDED_ROUTES, Route
from tray_app.gateway.shared_budgets import Counted, Period, Reserved, SharedBudgets
from tray_app.gateway.sharing import (
    BUDGETED_DEFAULT_OUTPUT,
    Generation,
    Sharing,
    requested_output,
)
from tray_app.gateway.upstream.model_guard import LOADING, WAITING_FOR_OTHERS, ModelGuard
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import ALL_SCOPES, Principal
from tray_app.storage.budgets import Budget
from tray_app.storage.database import Database
from tray_app.storage.usage_history import UsageHistory

ROUTES = {r.path: r for r in FORWARDED_ROUTES}
CHAT, EMBEDDINGS = ROUTES["/v1/chat/completions"], ROUTES["/v1/embeddings"]
QUESTION = '"messages":[{"role":"user","content":"hello there friend"}]'  # estimate 9


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "lmgate.db")
    yield database
    database.close()


def gate(db: Database, *, slots: int = 4) -> tuple[Sharing, FairQueue, BudgetLedger]:
    queue = FairQueue(slots=slots, per_caller=4, max_waiting=10, max_waiting_per_client=10)
    ledger = BudgetLedger(UsageHistory(db), FakeClock())
    return Sharing(queue, guard=None, ledger=ledger, max_wait=1, max_stream_wait=1), queue, ledger


def body(route: Route, text: str) -> bytes:
    return ("{" + text + "}").encode()


def caller(budget: Budget | None = None, max_tokens: int | None = None) -> Principal:
    return Principal("key:k", ALL_SCOPES, max_tokens=max_tokens, budget=budget)


class TestTheCapAGenerationCarries:
    async def test_no_budget_keeps_the_principal_s_cap_and_reserves_nothing(
        self, db: Database
    ) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION},"max_tokens":100'))
        generation = await sharing.admit(caller(max_tokens=50), "127.0.0.1", CHAT, prepared)
        assert generation.max_tokens == 50 and ledger.principals_tracked == 0

    async def test_a_budgeted_principal_s_own_cap_bounds_what_it_reserves(
        self, db: Database
    ) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION},"max_tokens":100'))
        who = caller(Budget(tokens_per_day=1000), max_tokens=50)
        generation = await sharing.admit(who, "127.0.0.1", CHAT, prepared)
        assert generation.max_tokens == 50 and ledger.reserved_tokens == 9 + 50

    async def test_a_request_without_a_length_gets_the_default_or_what_is_left(
        self, db: Database
    ) -> None:
        sharing, _, _ = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION}'))
        roomy = await sharing.admit(caller(Budget(tokens_per_day=10**9)), "c", CHAT, prepared)
        assert roomy.max_tokens == BUDGETED_DEFAULT_OUTPUT
        roomy.settle(None, 0)
        tight = await sharing.admit(caller(Budget(tokens_per_month=30)), "c", CHAT, prepared)
        assert tight.max_tokens == 30 - 9

    async def test_embeddings_reserve_their_input_and_carry_no_cap(self, db: Database) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(
            EMBEDDINGS, body(EMBEDDINGS, '"model":"e","input":"' + "x" * 40 + '"')
        )
        assert requested_output(prepared.payload, EMBEDDINGS) == 0
        generation = await sharing.admit(
            caller(Budget(tokens_per_day=100)), "c", EMBEDDINGS, prepared
        )
        assert generation.max_tokens is None and ledger.reserved_tokens == 10
        assert generation.settle(Usage(12, 0), 0) == Usage(12, 0)
        assert ledger.reserved_tokens == 0


class TestGivingBack:
    async def test_a_slot_is_taken_once_and_given_back_once(self, db: Database) -> None:
        sharing, queue, _ = gate(db, slots=1)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION}'))
        generation = await sharing.admit(caller(), "c", CHAT, prepared)
        await generation.wait_turn(None)
        assert queue.busy == 1
        generation.release()
        generation.release()
        assert queue.busy == 0
        assert generation.settle(Usage(1, 2), 10) == Usage(1, 2)  # nothing reserved: as used

    async def test_settling_twice_charges_once(self, db: Database) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION},"max_tokens":10'))
        who = caller(Budget(tokens_per_day=100))
        generation = await sharing.admit(who, "c", CHAT, prepared)
        assert generation.settle(None, 500) == Usage(9, 5)  # an estimate from the bytes sent
        assert generation.settle(None, 500) is None
        assert ledger.status("key:k", Budget(tokens_per_day=100)).day_used == 14


def guarded(
    *, slots: int = 1, max_wait: float = 5, total: int = 10, per_caller: int = 10
) -> tuple[Sharing, FairQueue, ModelGuard]:
    queue = FairQueue(
        slots=slots,
        per_caller=4,
        max_waiting=total,
        max_waiting_per_client=10,
        max_waiting_per_caller=per_caller,
    )
    guard = ModelGuard(MemoryModelApi(), policy=ModelSwitch.WAIT, load_timeout=5, clock=FakeClock())
    sharing = Sharing(queue, guard=guard, ledger=None, max_wait=max_wait, max_stream_wait=max_wait)
    return sharing, queue, guard


async def asking(sharing: Sharing, model: str, name: str = "key:k") -> Generation:
    prepared = prepare_body(CHAT, body(CHAT, f'"model":"{model}",{QUESTION}'))
    return await sharing.admit(Principal(name, ALL_SCOPES), "198.51.100.1", CHAT, prepared)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class TestWaitingForAModelCountsInTheQueue:
    """A flood of requests for a model that is not loaded waits in the model guard, not in
    the queue: each holds a place in the queue meanwhile, so the queue's bounds hold them."""

    async def test_requests_waiting_for_a_model_fill_the_caller_s_places(self) -> None:
        sharing, _, guard = guarded(slots=2, per_caller=1)
        streaming = await guard.enter(A, max_wait=5)  # someone reads from A: B must wait
        first = await asking(sharing, B)
        waiting = asyncio.create_task(first.wait_turn(None))
        await settle()
        assert not waiting.done()
        with pytest.raises(ApiError) as caught:
            await (await asking(sharing, B)).wait_turn(None)
        assert (caught.value.status, caught.value.code) == (429, "queue_full")
        second = await asking(sharing, B, "key:other")
        other = asyncio.create_task(second.wait_turn(None))
        await settle()
        assert not other.done()  # another caller still has its own places
        guard.leave(streaming)
        await asyncio.wait_for(waiting, 1)
        first.release()
        await asyncio.wait_for(other, 1)
        second.release()
        # every place is free again: as many may wait as before
        streaming = await guard.enter(A, max_wait=5)
        again = asyncio.create_task((await asking(sharing, C)).wait_turn(None))
        await settle()
        assert not again.done()
        guard.leave(streaming)
        await asyncio.wait_for(again, 1)

    async def test_with_no_room_to_wait_only_a_model_that_needs_no_wait_is_served(
        self,
    ) -> None:
        sharing, _, _ = guarded(total=0)
        served = await asking(sharing, A)
        await served.wait_turn(None)  # loaded, a slot free: it holds no place at all
        served.release()
        with pytest.raises(ApiError) as caught:
            await (await asking(sharing, B)).wait_turn(None)  # a load is a wait
        assert (caught.value.status, caught.value.code) == (503, "queue_full")

    async def test_a_place_held_in_the_guard_is_given_back_when_the_slot_is_free(
        self,
    ) -> None:
        sharing, queue, _ = guarded(total=1)
        loaded = await asking(sharing, B)
        await loaded.wait_turn(None)  # a load, then a free slot
        loaded.release()
        waiting = await asking(sharing, B, "key:other")
        await waiting.wait_turn(None)  # B loaded now, the slot free again
        holder = queue.try_acquire("x")
        assert holder is None  # waiting holds the one slot
        behind = asyncio.create_task((await asking(sharing, B, "key:third")).wait_turn(None))
        await settle()
        assert queue.waiting == 1  # the one place in the queue: nobody else's held
        waiting.release()
        await asyncio.wait_for(behind, 1)

    async def test_a_refusal_or_a_hang_up_in_the_guard_gives_the_place_back(self) -> None:
        sharing, queue, guard = guarded(total=1, max_wait=0.05)
        streaming = await guard.enter(A, max_wait=5)
        with pytest.raises(ApiError) as caught:
            await (await asking(sharing, B)).wait_turn(None)
        assert caught.value.code == "model_busy"
        leaving = asyncio.create_task((await asking(sharing, B)).wait_turn(None))
        await settle()
        leaving.cancel()
        await settle()
        queue.free_place(queue.hold_place("key:k", "198.51.100.1"))  # the one place is free
        guard.leave(streaming)


class TestOneDeadline:
    async def test_the_guard_and_the_queue_share_one_max_wait(self) -> None:
        sharing, queue, guard = guarded(max_wait=0.4)
        streaming = await guard.enter(A, max_wait=5)
        slot = queue.try_acquire("key:busy")
        assert slot is not None
        loop = asyncio.get_running_loop()
        loop.call_later(0.25, guard.leave, streaming)  # B may load after 0.25 s of 0.4
        started = loop.time()
        with pytest.raises(ApiError) as caught:
            await (await asking(sharing, B)).wait_turn(None)
        waited = loop.time() - started
        assert caught.value.code == "queue_timeout"
        assert "waited 0.4 s" in caught.value.message  # the whole wait, not what was left
        assert 0.35 <= waited < 0.6  # not 0.25 + 0.4
        queue.release(slot)


async def test_a_draft_model_the_body_names_goes_to_the_guard() -> None:
    sharing, queue, _ = guarded()
    prepared = prepare_body(CHAT, body(CHAT, f'"model":"{A}","draft_model":"{B}",{QUESTION}'))
    generation = await sharing.admit(Principal("key:k", ALL_SCOPES), "198.51.100.1", CHAT, prepared)
    with pytest.raises(ApiError) as caught:
        await generation.wait_turn(None)
    assert caught.value.code == "model_busy" and repr(B) in caught.value.message
    assert queue.busy == 0


async def test_a_wait_in_the_guard_then_the_queue_tells_both_and_keeps_one_place() -> None:
    sharing, queue, guard = guarded(per_caller=1)
    streaming = await guard.enter(A, max_wait=5)
    slot = queue.try_acquire("key:busy")
    assert slot is not None
    told: list[str] = []
    generation = await asking(sharing, B)
    waiting = asyncio.create_task(generation.wait_turn(told.append))
    await settle()
    guard.leave(streaming)  # B loads; the one slot is still taken: it queues, on its place
    await settle()
    assert queue.waiting == 1 and not waiting.done()
    queue.release(slot)
    await asyncio.wait_for(waiting, 1)
    assert told == [WAITING_FOR_OTHERS, LOADING, "waiting, 0 ahead"]
    # its turn is counted as its caller's: the caller's cap of one holds the next one back
    second = FairQueue(slots=2, per_caller=1, max_waiting=1, max_waiting_per_client=1)
    capped = Sharing(second, guard=None, ledger=None, max_wait=0.05, max_stream_wait=0.05)
    await (await asking(capped, A)).wait_turn(None)
    with pytest.raises(ApiError) as caught:
        await (await asking(capped, A)).wait_turn(None)
    assert caught.value.code == "too_many_concurrent_requests"  # a slot was free: its own cap
    generation.release()


class TestARetryOnAnotherUpstream:
    """A request that could not connect to one upstream waits again for the other's turn:
    that upstream's model guard, within what is left of the same deadline, keeping its slot."""

    def two_machines(
        self, *, max_wait: float = 5
    ) -> tuple[Sharing, FairQueue, ModelGuard, ModelGuard]:
        sharing, queue, first = guarded(slots=1, max_wait=max_wait)
        second = ModelGuard(
            MemoryModelApi(), policy=ModelSwitch.WAIT, load_timeout=5, clock=FakeClock()
        )
        sharing.guards = {"one": first, "two": second}
        return sharing, queue, first, second

    async def test_it_leaves_the_first_guard_enters_the_second_and_keeps_its_slot(
        self,
    ) -> None:
        sharing, queue, first, second = self.two_machines()
        generation = await asking(sharing, A)
        await generation.wait_turn(None, "one")
        assert (first._active[A], second._active[A], queue.busy) == (1, 0, 1)
        await generation.wait_turn(None, "two")
        assert (first._active[A], second._active[A], queue.busy) == (0, 1, 1)
        generation.release()
        assert (first._active[A], second._active[A], queue.busy) == (0, 0, 0)

    async def test_with_a_queue_per_machine_the_slot_moves_to_the_second_machine(
        self,
    ) -> None:
        sharing, first_queue, _, _ = self.two_machines()
        second_queue = FairQueue(slots=1, per_caller=4, max_waiting=10, max_waiting_per_client=10)
        sharing.queues = {"one": first_queue, "two": second_queue}
        generation = await asking(sharing, A)
        await generation.wait_turn(None, "one")
        assert (first_queue.busy, second_queue.busy) == (1, 0)
        await generation.wait_turn(None, "two")
        assert (first_queue.busy, second_queue.busy) == (0, 1)
        generation.release()
        assert (first_queue.busy, second_queue.busy) == (0, 0)

    async def test_a_busy_machine_holds_no_slot_of_another(self) -> None:
        sharing, first_queue, _, _ = self.two_machines(max_wait=0.1)
        second_queue = FairQueue(slots=1, per_caller=4, max_waiting=10, max_waiting_per_client=10)
        sharing.queues = {"one": first_queue, "two": second_queue}
        hung = await asking(sharing, A, "key:hung")
        await hung.wait_turn(None, "one")  # the first machine's only slot, held
        with pytest.raises(ApiError) as waited:
            await (await asking(sharing, A, "key:other")).wait_turn(None, "one")
        assert waited.value.code == "queue_timeout"
        served = await asking(sharing, A, "key:other")
        await served.wait_turn(None, "two")  # at once: the second machine's slot is free
        assert second_queue.busy == 1
        served.release()
        hung.release()

    async def test_the_second_wait_has_only_what_is_left_of_the_deadline(self) -> None:
        sharing, _, _, second = self.two_machines(max_wait=0.2)
        blocking = await second.enter(B, max_wait=5)  # someone reads B on the second machine
        generation = await asking(sharing, A)
        await generation.wait_turn(None, "one")
        await asyncio.sleep(0.15)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ApiError) as refused:
            await generation.wait_turn(None, "two")
        assert refused.value.code == "model_busy"
        waited = asyncio.get_running_loop().time() - started
        assert waited < 0.15  # the 0.05 s left, not another 0.2
        second.leave(blocking)
        generation.release()

    def test_an_upstream_without_a_guard_of_its_own_has_the_shared_one(self) -> None:
        sharing, _, first, second = self.two_machines()
        assert sharing.guard_for("two") is second
        assert sharing.guard_for("elsewhere") is first  # guarded() set the shared guard
        assert sharing.guard_for(None) is first


class CountedSlots:
    """Each upstream's slots as the replicas count them together, in memory: ``free`` of
    each, a wait for one ending at the deadline."""

    def __init__(self, free: int) -> None:
        self.free = {"one": free, "two": free}
        self.deadlines: list[float] = []
        self._serial = 0

    async def take_slot(self, upstream: str, deadline: float, notify: Any) -> str | None:
        self.deadlines.append(deadline)
        if self.free[upstream] == 0:
            await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
            return None
        self.free[upstream] -= 1
        self._serial += 1
        return f"{upstream}:{self._serial}"

    def give_back_slot(self, upstream: str, slot: str) -> None:
        assert slot.startswith(upstream + ":")
        self.free[upstream] += 1


class TestSlotsCountedOnEveryReplica:
    def with_slots(self, free: int, max_wait: float = 5) -> tuple[Sharing, FairQueue, CountedSlots]:
        sharing, queue, _ = guarded(slots=4, max_wait=max_wait)
        sharing.slots = slots = CountedSlots(free)
        return sharing, queue, slots

    async def test_a_generation_takes_one_after_its_turn_and_gives_it_back_once(self) -> None:
        sharing, queue, slots = self.with_slots(1)
        generation = await asking(sharing, A)
        await generation.wait_turn(None, "one")
        assert (queue.busy, slots.free["one"]) == (1, 0)
        generation.release()
        generation.release()
        assert (queue.busy, slots.free["one"]) == (0, 1)

    async def test_a_retry_on_another_upstream_moves_its_slot_there(self) -> None:
        sharing, _, slots = self.with_slots(1)
        second_queue = FairQueue(slots=1, per_caller=4, max_waiting=10, max_waiting_per_client=10)
        sharing.queues = {"two": second_queue}
        generation = await asking(sharing, A)
        await generation.wait_turn(None, "one")
        await generation.wait_turn(None, "two")
        assert slots.free == {"one": 1, "two": 0}
        generation.release()
        assert slots.free == {"one": 1, "two": 1}

    async def test_none_free_within_the_wait_is_a_queue_timeout_and_gives_the_turn_back(
        self,
    ) -> None:
        sharing, queue, slots = self.with_slots(0, max_wait=0.1)
        generation = await asking(sharing, A)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ApiError) as refused:
            await generation.wait_turn(None, "one")
        assert (refused.value.status, refused.value.code) == (503, "queue_timeout")
        assert slots.deadlines == [pytest.approx(started + 0.1, abs=0.02)]  # the same deadline
        generation.release()
        assert queue.busy == 0


class ScriptedRedis(SharedBudgets):
    """The team's counts in Redis as a test scripts them: each read and each reservation
    answers the next of its list (the last one again once the list is used up)."""

    def __init__(
        self,
        reads: list[Counted | str | None],
        reservations: list[Reserved | Counted | str | None],
        before_read: Any = None,
    ) -> None:
        self.reads, self.reservations = reads, reservations
        self.before_read = before_read
        self.settled: list[tuple[str, int]] = []

    @staticmethod
    def _next(answers: list[Any]) -> Any:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async def read(
        self, principal: str, period: Period, *, start: tuple[int, int] | None, reset: bool
    ) -> Counted | str | None:
        if self.before_read is not None:
            self.before_read()
        return self._next(self.reads)  # type: ignore[no-any-return]

    async def reserve(
        self,
        principal: str,
        period: Period,
        ticket: int,
        tokens: int,
        limits: tuple[int | None, int | None],
    ) -> Reserved | Counted | str | None:
        return self._next(self.reservations)  # type: ignore[no-any-return]

    def settle(self, principal: str, member: str, tokens: int, period: Period, failed: Any) -> None:
        self.settled.append((member, tokens))

    def drop(self, principal: str, period: Period) -> None:
        return None


class TestSharedBudgetsRefusalsAndRaces:
    """What the ledger makes of Redis's less usual answers; the usual ones are driven against
    a real Redis in tests/integration/gateway/test_shared_budgets.py."""

    PROMPT = f'"model":"m",{QUESTION},"max_tokens":91'  # reserves 100

    def shared_gate(self, db: Database, redis: ScriptedRedis) -> tuple[Sharing, BudgetLedger]:
        sharing, _, ledger = gate(db)
        ledger.shared = redis
        return sharing, ledger

    async def test_a_reservation_another_replica_beats_every_time_is_refused_and_given_back(
        self, db: Database
    ) -> None:
        room = Counted(day_used=850, month_used=850, reserved=0)
        redis = ScriptedRedis([room], [room])  # fits by the counts, never taken
        sharing, ledger = self.shared_gate(db, redis)
        prepared = prepare_body(CHAT, body(CHAT, self.PROMPT))
        with pytest.raises(ApiError) as refused:
            await sharing.admit(caller(Budget(tokens_per_day=1000)), "c", CHAT, prepared)
        assert (refused.value.status, refused.value.code) == (429, "budget_exceeded")
        assert "150 of your 1,000" in refused.value.message  # the team counts, not a guess
        assert ledger.reserved_tokens == 0

    async def test_a_counter_gone_when_reserving_is_started_again_first(self, db: Database) -> None:
        counted = Counted(day_used=0, month_used=0, reserved=0)
        redis = ScriptedRedis([counted], [None, Reserved("r:1:100", counted)])
        sharing, ledger = self.shared_gate(db, redis)
        prepared = prepare_body(CHAT, body(CHAT, self.PROMPT))
        generation = await sharing.admit(caller(Budget(tokens_per_day=1000)), "c", CHAT, prepared)
        assert ledger.reserved_tokens == 100
        generation.settle(Usage(9, 20), 0)
        assert redis.settled == [("r:1:100", 29)]

    async def test_redis_lost_while_a_counter_starts_leaves_the_ledger_alone(
        self, db: Database
    ) -> None:
        redis = ScriptedRedis([None, "unreachable"], ["unreachable"])
        sharing, ledger = self.shared_gate(db, redis)
        prepared = prepare_body(CHAT, body(CHAT, self.PROMPT))
        who = caller(Budget(tokens_per_day=1000))
        generation = await sharing.admit(who, "c", CHAT, prepared)  # as on one machine
        assert ledger.reserved_tokens == 100
        assert "key:k" in ledger._stale  # its counters start again once Redis is back
        generation.settle(None, 0)

    async def test_midnight_during_a_shared_read_reads_the_new_day(self, db: Database) -> None:
        sharing, ledger = self.shared_gate(db, ScriptedRedis([Counted(0, 0, 0)], []))
        clock = ledger._clock
        assert isinstance(clock, FakeClock)
        clock.advance(86400 - clock.time() % 86400 - 1)  # a second before midnight
        reads = 0

        def midnight_on_the_first() -> None:
            nonlocal reads
            reads += 1
            if reads == 1:
                clock.advance(2)

        ledger.shared = ScriptedRedis(
            [Counted(700, 700, 0), Counted(0, 700, 0)],
            [Reserved("r:1:100", Counted(0, 700, 100))],
            before_read=midnight_on_the_first,
        )
        prepared = prepare_body(CHAT, body(CHAT, self.PROMPT))
        await sharing.admit(caller(Budget(tokens_per_day=1000)), "c", CHAT, prepared)
        assert reads == 2  # the day that ended, then the new one
        status = ledger.status("key:k", Budget(tokens_per_day=1000))
        assert status.day_used == 0
