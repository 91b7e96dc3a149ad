"""The fair queue on its own: who gets the next generation slot, what a waiting client is told,
and how waiting is bounded and ended.

Every test drives a real FairQueue on the running loop: waiters are real tasks awaiting
``acquire``, turns are handed on by real ``release`` calls, and time limits are real (short)
waits. Order and positions are asserted exactly, so a queue that serves by arrival, lets a
caller past its cap, or tells a wrong place fails here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tray_app.gateway import fair_queue
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.fair_queue import (
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    FairQueue,
    Turn,
)

CLIENT = "203.0.113.9"


def queue(
    slots: int = 1, per_caller: int = 1, max_waiting: int = 100, per_client: int = 100
) -> FairQueue:
    return FairQueue(
        slots=slots,
        per_caller=per_caller,
        max_waiting=max_waiting,
        max_waiting_per_client=per_client,
    )


async def settle() -> None:
    """Lets every ready task and callback run (grants cascade one loop turn at a time)."""
    for _ in range(20):
        await asyncio.sleep(0)


def held(q: FairQueue, caller: str = "holder") -> Turn:
    turn = q.try_acquire(caller)
    assert turn is not None
    return turn


@dataclass
class Served:
    """Waiters that record their turn and give it back at once, so one release cascades
    through the whole queue in serving order."""

    q: FairQueue
    order: list[str] = field(default_factory=list)
    told: dict[str, list[str]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def wait(self, caller: str, name: str | None = None, client: str = CLIENT) -> None:
        label = name or caller
        said = self.told.setdefault(label, [])

        async def run() -> None:
            turn = await self.q.acquire(caller, client, max_wait=10, notify=said.append)
            self.order.append(label)
            self.q.release(turn)

        self.tasks.append(asyncio.create_task(run()))


@pytest.fixture
def cleanup() -> Iterator[list[asyncio.Task[object]]]:
    tasks: list[asyncio.Task[object]] = []
    yield tasks
    for task in tasks:
        task.cancel()


# ---- the fast path ----------------------------------------------------------------------------


async def test_try_acquire_grants_while_a_slot_is_free_and_the_caller_is_under_its_cap() -> None:
    q = queue(slots=3, per_caller=2)
    first, second = held(q, "a"), held(q, "a")
    assert (first.caller, second.caller) == ("a", "a")
    assert q.try_acquire("a") is None  # at its cap, a slot still free
    third = held(q, "b")
    assert q.busy == 3
    assert q.try_acquire("c") is None  # every slot in use
    q.release(third)
    assert held(q, "c").caller == "c"


async def test_try_acquire_never_overtakes_a_waiter() -> None:
    # A waits (at its cap) while a slot is free: the fast path declines even for another
    # caller, and acquire then grants that caller at once, since it overtakes nobody.
    q = queue(slots=2, per_caller=1)
    first = held(q, "a")
    waiting = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    await settle()
    assert q.waiting == 1 and q.busy == 1
    assert q.try_acquire("b") is None
    turn = await asyncio.wait_for(q.acquire("b", CLIENT, max_wait=10), 1)
    assert turn.caller == "b" and q.busy == 2 and q.waiting == 1
    q.release(turn)
    assert q.waiting == 1 and not waiting.done()  # still at its cap
    q.release(first)
    assert (await asyncio.wait_for(waiting, 1)).caller == "a"


async def test_release_is_idempotent() -> None:
    q = queue(slots=2)
    turn = held(q, "a")
    other = held(q, "b")
    q.release(turn)
    q.release(turn)
    assert q.busy == 1
    assert q.try_acquire("a") is not None  # its count went down once, not below zero
    q.release(other)
    q.release(other)
    assert q.busy == 1


# ---- round-robin ------------------------------------------------------------------------------


async def test_turns_go_round_robin_across_callers_not_by_arrival() -> None:
    q = queue()
    holder = held(q)
    served = Served(q)
    for n in range(4):
        served.wait("heavy", f"heavy{n}")
    served.wait("light")
    served.wait("other")
    await settle()
    assert q.waiting == 6
    q.release(holder)
    await settle()
    assert served.order == ["heavy0", "light", "other", "heavy1", "heavy2", "heavy3"]
    assert q.busy == 0 and q.waiting == 0


async def test_a_heavy_caller_and_a_light_one_alternate() -> None:
    q = queue()
    holder = held(q)
    order: list[str] = []

    async def keep_asking(caller: str, times: int) -> None:
        for _ in range(times):
            turn = await q.acquire(caller, CLIENT, max_wait=10)
            order.append(caller)
            await asyncio.sleep(0)
            q.release(turn)

    heavy = [asyncio.create_task(keep_asking("heavy", 1)) for _ in range(10)]
    light = asyncio.create_task(keep_asking("light", 4))
    await settle()
    q.release(holder)
    await asyncio.wait_for(asyncio.gather(*heavy, light), 2)
    assert order[:8] == ["heavy", "light"] * 4
    assert order[8:] == ["heavy"] * 6


async def test_a_caller_never_runs_more_than_its_cap() -> None:
    q = queue(slots=4, per_caller=2)
    first, second = held(q, "a"), held(q, "a")
    third = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    await settle()
    assert not third.done() and q.busy == 2  # two slots free, but a is at its cap
    q.release(first)
    assert (await asyncio.wait_for(third, 1)).caller == "a"
    assert q.busy == 2
    q.release(second)


async def test_a_caller_at_its_cap_is_passed_over_and_keeps_its_place() -> None:
    q = queue(slots=2, per_caller=1)
    a_running, x_running = held(q, "a"), held(q, "x")
    served = Served(q)
    served.wait("a")
    served.wait("b")
    served.wait("c")
    await settle()
    q.release(x_running)  # a is first but at its cap: b goes
    await settle()
    assert served.order == ["b", "c"]  # each released at once, so c followed
    served.wait("d")
    await settle()
    assert served.order == ["b", "c", "d"]
    q.release(a_running)
    await settle()
    assert served.order == ["b", "c", "d", "a"]


async def test_turns_taken_at_once_count_against_the_caller_when_a_queue_forms() -> None:
    q = queue(slots=3, per_caller=3)
    burst = [held(q, "heavy") for _ in range(3)]  # nobody waited: all three at once
    served = Served(q)
    served.wait("heavy")
    served.wait("light")
    await settle()
    q.release(burst[0])
    await settle()
    assert served.order == ["light", "heavy"]
    for turn in burst[1:]:
        q.release(turn)


async def test_one_long_answer_does_not_hold_the_rounds_back() -> None:
    # A turn that runs for minutes keeps the round it started in; callers that came after the
    # queue moved on still start from where the queue is, not from that round.
    q = queue(slots=2)
    long = held(q, "long")
    other = held(q, "other")
    served = Served(q)
    for n in range(4):
        served.wait("a", f"a{n}")
    await settle()
    q.release(other)
    await settle()
    assert served.order == ["a0", "a1", "a2", "a3"]
    newcomer = held(q, "c")  # at once, in the round the queue is in
    served.wait("a", "a4")
    served.wait("c")
    await settle()
    q.release(newcomer)
    await settle()
    assert served.order[4:] == ["a4", "c"]
    q.release(long)


async def test_a_callers_next_request_takes_its_place_when_the_first_one_leaves() -> None:
    q = queue()
    holder = held(q)
    served = Served(q)
    served.wait("a", "a0")
    served.wait("a", "a1")
    served.wait("b")
    await settle()
    served.tasks[0].cancel()
    await settle()
    q.release(holder)
    await settle()
    assert served.order == ["b", "a1"]  # a1 keeps its round-2 place behind b


async def test_callers_that_no_longer_matter_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    # One round number is kept per caller; once the rounds served have passed it, it means
    # the same as none, so the memory stays bounded however many callers come and go.
    monkeypatch.setattr(fair_queue, "_PRUNE_AT", 8)
    q = queue()
    served = Served(q)
    for n in range(40):
        holder = held(q)
        served.wait("steady")
        served.wait(f"once{n}")
        await settle()
        q.release(holder)
        await settle()
    assert served.order[:4] == ["steady", "once0", "steady", "once1"]
    assert len(q._next_round) <= 8 + 2
    assert q.busy == 0 and q.waiting == 0


# ---- telling waiters their place ------------------------------------------------------------


async def test_each_waiter_is_told_how_many_go_first_and_again_when_that_changes() -> None:
    q = queue()
    holder = held(q)
    served = Served(q)
    for n in range(3):
        served.wait("a", f"a{n}")
    served.wait("b")
    await settle()
    assert served.told == {
        "a0": ["waiting, 0 ahead"],
        "a1": ["waiting, 2 ahead"],  # b's one request comes before a's second
        "a2": ["waiting, 3 ahead"],
        "b": ["waiting, 1 ahead"],
    }
    served.wait("c")  # a new caller's first request goes before a's later ones
    await settle()
    assert served.told["c"] == ["waiting, 2 ahead"]
    assert served.told["a1"] == ["waiting, 2 ahead", "waiting, 3 ahead"]
    assert served.told["a2"] == ["waiting, 3 ahead", "waiting, 4 ahead"]
    assert served.told["a0"] == ["waiting, 0 ahead"]  # unchanged places are not told again
    assert served.told["b"] == ["waiting, 1 ahead"]
    q.release(holder)
    await settle()
    assert served.order == ["a0", "b", "c", "a1", "a2"]
    assert served.told["a2"][-3:] == ["waiting, 2 ahead", "waiting, 1 ahead", "waiting, 0 ahead"]


async def test_a_waiter_that_is_leaving_holds_no_place() -> None:
    q = queue()
    holder = held(q)
    served = Served(q)
    served.wait("a")
    served.wait("b")
    served.wait("c")
    await settle()
    assert served.told["c"] == ["waiting, 2 ahead"]
    # a is granted and b hangs up in the same instant: places are told before b's task has
    # run, and b, already leaving, must not count.
    q.release(holder)
    served.tasks[1].cancel()
    await settle()
    assert served.told["c"] == ["waiting, 2 ahead", "waiting, 0 ahead"]
    assert served.order == ["a", "c"]
    assert q.busy == 0 and q.waiting == 0


async def test_a_waiter_without_notify_still_counts_for_those_behind() -> None:
    q = queue()
    holder = held(q)
    quiet = asyncio.create_task(q.acquire("quiet", CLIENT, max_wait=10))
    told: list[str] = []
    loud = asyncio.create_task(q.acquire("loud", CLIENT, max_wait=10, notify=told.append))
    await settle()
    assert told == ["waiting, 1 ahead"]
    q.release(holder)
    turn = await asyncio.wait_for(quiet, 1)
    await settle()
    assert told == ["waiting, 1 ahead", "waiting, 0 ahead"]
    q.release(turn)
    q.release(await asyncio.wait_for(loud, 1))


async def test_a_request_granted_at_once_is_told_nothing() -> None:
    q = queue()
    told: list[str] = []
    turn = await q.acquire("a", CLIENT, max_wait=10, notify=told.append)
    await settle()
    assert told == [] and q.waiting == 0
    q.release(turn)


# ---- giving up --------------------------------------------------------------------------------


async def test_a_waiter_that_is_cancelled_leaves_at_once() -> None:
    q = queue(per_client=1)
    holder = held(q)
    leaving = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    await settle()
    assert q.waiting == 1
    leaving.cancel()
    await settle()
    assert leaving.cancelled()
    assert q.waiting == 0
    # its place from this address is free again
    staying = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    await settle()
    assert q.waiting == 1
    q.release(holder)
    q.release(await asyncio.wait_for(staying, 1))
    assert q.busy == 0


async def test_a_turn_granted_as_the_waiter_leaves_goes_to_the_next() -> None:
    q = queue()
    holder = held(q)
    first = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    second = asyncio.create_task(q.acquire("b", CLIENT, max_wait=10))
    await settle()
    q.release(holder)  # a's turn is set ...
    first.cancel()  # ... and a hangs up before its task could take it
    turn = await asyncio.wait_for(second, 1)
    assert first.cancelled()
    assert turn.caller == "b" and q.busy == 1 and q.waiting == 0
    q.release(turn)
    assert q.busy == 0


async def test_a_waiter_cancelled_just_before_the_grant_is_passed_over() -> None:
    q = queue()
    holder = held(q)
    first = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    second = asyncio.create_task(q.acquire("b", CLIENT, max_wait=10))
    await settle()
    first.cancel()  # a's wait is cancelled, its task not yet run ...
    q.release(holder)  # ... when the slot frees: b gets it
    turn = await asyncio.wait_for(second, 1)
    await settle()
    assert first.cancelled() and turn.caller == "b" and q.busy == 1 and q.waiting == 0
    q.release(turn)


async def test_waiting_longer_than_max_wait_ends_in_a_timeout_and_leaves() -> None:
    q = queue()
    holder = held(q)
    with pytest.raises(ApiError) as caught:
        await q.acquire("a", CLIENT, max_wait=0.05)
    err = caught.value
    assert (err.status, err.code) == (503, "queue_timeout")
    assert "0.05 s" in err.message
    assert err.headers["Retry-After"] == "2"  # the first estimate of a turn
    assert q.waiting == 0
    q.release(holder)
    assert q.busy == 0


async def test_a_turn_that_comes_within_max_wait_is_taken() -> None:
    q = queue()
    holder = held(q)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, q.release, holder)
    turn = await asyncio.wait_for(q.acquire("a", CLIENT, max_wait=0.5), 2)
    assert turn.caller == "a"
    q.release(turn)


async def test_a_turn_granted_as_max_wait_runs_out_is_taken() -> None:
    # max_wait 0: the time is up in the same loop turn in which the slot frees.
    q = queue()
    holder = held(q)
    waiter = asyncio.create_task(q.acquire("a", CLIENT, max_wait=0))
    await asyncio.sleep(0)  # the waiter queues; its time-out is due next
    q.release(holder)
    turn = await asyncio.wait_for(waiter, 1)
    assert turn.caller == "a" and q.busy == 1
    q.release(turn)


# ---- Retry-After ------------------------------------------------------------------------------


async def test_retry_after_is_a_mean_turn_kept_between_its_bounds() -> None:
    q = queue()
    assert q.retry_after() == 2.0  # nothing measured yet
    turn = held(q)
    turn.started -= 12  # one turn of 12 s moves the mean a tenth of the way: to 3 s
    q.release(turn)
    assert q.retry_after() == pytest.approx(3.0, abs=0.01)
    for _ in range(60):  # quick turns: never below the lower bound
        q.release(held(q))
    assert q.retry_after() == RETRY_AFTER_MIN
    for _ in range(60):  # turns of a minute: never above the upper bound
        turn = held(q)
        turn.started -= 60
        q.release(turn)
    assert q.retry_after() == RETRY_AFTER_MAX


# ---- bounds against a flood -----------------------------------------------------------------


class TestQueueFloodIsBounded:
    """Waiting costs memory and a task: it is bounded in total and per client address group,
    and a full queue refuses at once (with Retry-After) instead of growing."""

    async def test_up_to_max_waiting_wait_in_total_then_503(
        self, cleanup: list[asyncio.Task[object]]
    ) -> None:
        q = queue(max_waiting=3)
        held(q)
        for n in range(3):
            cleanup.append(asyncio.create_task(q.acquire(f"c{n}", f"198.51.100.{n}", max_wait=10)))
        await settle()
        assert q.waiting == 3
        with pytest.raises(ApiError) as caught:
            await q.acquire("c9", "198.51.100.9", max_wait=10)
        err = caught.value
        assert (err.status, err.code) == (503, "queue_full")
        assert "queue.max_waiting" in err.message
        assert err.headers["Retry-After"] == "2"
        assert q.waiting == 3

    async def test_up_to_max_waiting_per_client_wait_from_one_address_then_429(
        self, cleanup: list[asyncio.Task[object]]
    ) -> None:
        q = queue(per_client=2)
        held(q)
        for n in range(2):
            cleanup.append(asyncio.create_task(q.acquire(f"c{n}", CLIENT, max_wait=10)))
        await settle()
        assert q.waiting == 2
        with pytest.raises(ApiError) as caught:
            await q.acquire("c9", CLIENT, max_wait=10)
        err = caught.value
        assert (err.status, err.code) == (429, "queue_full")
        assert "queue.max_waiting_per_client" in err.message
        assert "Retry-After" in err.headers
        # another address still may wait
        cleanup.append(asyncio.create_task(q.acquire("c9", "198.51.100.1", max_wait=10)))
        await settle()
        assert q.waiting == 3

    async def test_an_ipv6_slash_64_counts_as_one_client(
        self, cleanup: list[asyncio.Task[object]]
    ) -> None:
        q = queue(per_client=1)
        held(q)
        cleanup.append(asyncio.create_task(q.acquire("a", "2001:db8:1:2::1", max_wait=10)))
        await settle()
        with pytest.raises(ApiError) as caught:
            await q.acquire("b", "2001:db8:1:2::ffff", max_wait=10)
        assert (caught.value.status, caught.value.code) == (429, "queue_full")
        cleanup.append(asyncio.create_task(q.acquire("b", "2001:db8:1:3::1", max_wait=10)))
        await settle()
        assert q.waiting == 2

    async def test_zero_lets_none_wait_but_a_free_slot_is_still_taken(self) -> None:
        q = queue(max_waiting=0, per_client=0, slots=1)
        turn = await q.acquire("a", CLIENT, max_wait=10)
        with pytest.raises(ApiError) as caught:
            await q.acquire("b", CLIENT, max_wait=10)
        assert caught.value.code == "queue_full"
        assert q.waiting == 0
        q.release(turn)

    async def test_a_place_given_up_or_served_is_free_again(
        self, cleanup: list[asyncio.Task[object]]
    ) -> None:
        q = queue(max_waiting=1, per_client=1)
        holder = held(q)
        first = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
        await settle()
        first.cancel()
        await settle()
        second = asyncio.create_task(q.acquire("b", CLIENT, max_wait=10))
        await settle()
        assert q.waiting == 1
        q.release(holder)
        turn = await asyncio.wait_for(second, 1)
        cleanup.append(asyncio.create_task(q.acquire("c", CLIENT, max_wait=10)))
        await settle()
        assert q.waiting == 1
        q.release(turn)


class TestOneCredentialCannotFillTheQueue:
    """A credential reaching LM Gate from many address groups (a tunnel's users, an IPv6 /48)
    is bounded by itself: the per-address bound alone would let it fill the whole queue."""

    async def test_up_to_max_waiting_per_caller_wait_from_any_addresses_then_429(
        self, cleanup: list[asyncio.Task[object]]
    ) -> None:
        q = FairQueue(
            slots=1,
            per_caller=1,
            max_waiting=100,
            max_waiting_per_client=10,
            max_waiting_per_caller=2,
        )
        held(q)
        for n in range(2):
            cleanup.append(asyncio.create_task(q.acquire("key:k", f"2001:db8:{n}::1", max_wait=10)))
        await settle()
        assert q.waiting == 2
        with pytest.raises(ApiError) as caught:
            await q.acquire("key:k", "2001:db8:9::1", max_wait=10)
        assert (caught.value.status, caught.value.code) == (429, "queue_full")
        assert "queue.max_waiting_per_caller" in caught.value.message
        assert "Retry-After" in caught.value.headers
        assert q.waiting == 2
        # another credential from the same addresses still may wait
        cleanup.append(asyncio.create_task(q.acquire("key:other", "2001:db8:9::1", max_wait=10)))
        await settle()
        assert q.waiting == 3

    async def test_a_place_the_caller_gave_up_is_its_own_again(self) -> None:
        q = FairQueue(
            slots=1,
            per_caller=1,
            max_waiting=100,
            max_waiting_per_client=10,
            max_waiting_per_caller=1,
        )
        holder = held(q)
        leaving = asyncio.create_task(q.acquire("key:k", "198.51.100.1", max_wait=10))
        await settle()
        leaving.cancel()
        await settle()
        staying = asyncio.create_task(q.acquire("key:k", "198.51.100.2", max_wait=10))
        await settle()
        assert q.waiting == 1
        q.release(holder)
        q.release(await asyncio.wait_for(staying, 1))

    async def test_without_a_bound_of_its_own_only_the_total_bounds_a_caller(
        self, cleanup: list[asyncio.Task[object]]
    ) -> None:
        q = queue(max_waiting=3, per_client=10)
        held(q)
        for n in range(3):
            cleanup.append(asyncio.create_task(q.acquire("key:k", f"198.51.100.{n}", max_wait=10)))
        await settle()
        assert q.waiting == 3
        with pytest.raises(ApiError) as caught:
            await q.acquire("key:k", "198.51.100.9", max_wait=10)
        assert (caught.value.status, caught.value.code) == (503, "queue_full")


class TestPlacesHeldOutsideTheQueue:
    """A request waiting for its model holds a place: it counts against every bound like a
    waiter, and becomes a waiter (counted once) when it queues."""

    def bounded(self, total: int = 100, client: int = 100, caller: int = 100) -> FairQueue:
        return FairQueue(
            slots=1,
            per_caller=1,
            max_waiting=total,
            max_waiting_per_client=client,
            max_waiting_per_caller=caller,
        )

    async def test_a_held_place_counts_against_the_total(self) -> None:
        q = self.bounded(total=2)
        q.hold_place("a", "198.51.100.1")
        q.hold_place("b", "198.51.100.2")
        with pytest.raises(ApiError) as caught:
            q.hold_place("c", "198.51.100.3")
        assert (caught.value.status, caught.value.code) == (503, "queue_full")
        held(q)
        with pytest.raises(ApiError):
            await q.acquire("c", "198.51.100.3", max_wait=10)
        assert q.waiting == 0

    async def test_a_held_place_counts_against_its_address_and_its_caller(self) -> None:
        q = self.bounded(client=1, caller=1)
        place = q.hold_place("a", CLIENT)
        for caller, client in (("b", CLIENT), ("a", "198.51.100.7")):
            with pytest.raises(ApiError) as caught:
                q.hold_place(caller, client)
            assert (caught.value.status, caught.value.code) == (429, "queue_full")
        q.free_place(place)
        q.free_place(place)  # a second give-back counts nothing out
        q.free_place(q.hold_place("b", CLIENT))
        other = q.hold_place("a", "198.51.100.7")
        q.hold_place("c", "198.51.100.8")
        with pytest.raises(ApiError):
            q.hold_place("d", "198.51.100.7")  # one place for that address, not two
        q.free_place(other)

    async def test_a_place_taken_into_the_queue_counts_once(self) -> None:
        q = self.bounded(total=1, client=1, caller=1)
        holder = held(q)
        place = q.hold_place("a", CLIENT)
        waiting = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10, place=place))
        await settle()
        assert q.waiting == 1  # the full queue had room: the place was its own
        q.free_place(place)  # acquire took it over: this counts nothing out
        with pytest.raises(ApiError):
            q.hold_place("b", "198.51.100.7")
        q.release(holder)
        turn = await asyncio.wait_for(waiting, 1)
        assert q.waiting == 0
        q.free_place(q.hold_place("a", CLIENT))  # its place is free again
        q.release(turn)

    async def test_a_place_whose_turn_comes_at_once_is_given_back(self) -> None:
        q = self.bounded(total=1)
        place = q.hold_place("a", CLIENT)
        turn = await q.acquire("a", CLIENT, max_wait=10, place=place)
        q.free_place(q.hold_place("b", CLIENT))
        q.release(turn)

    async def test_a_place_given_back_already_is_checked_like_none(self) -> None:
        q = self.bounded(total=1)
        holder = held(q)
        place = q.hold_place("a", CLIENT)
        q.free_place(place)
        other = q.hold_place("b", CLIENT)
        with pytest.raises(ApiError):
            await q.acquire("a", CLIENT, max_wait=10, place=place)
        q.free_place(other)
        q.release(holder)

    async def test_a_waiter_with_a_place_that_gives_up_frees_it(self) -> None:
        q = self.bounded(total=1)
        holder = held(q)
        place = q.hold_place("a", CLIENT)
        leaving = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10, place=place))
        await settle()
        leaving.cancel()
        await settle()
        assert q.waiting == 0
        q.free_place(q.hold_place("b", CLIENT))
        q.release(holder)


async def test_a_deadline_ends_the_wait_and_the_timeout_names_the_whole_wait() -> None:
    q = queue()
    holder = held(q)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ApiError) as caught:
        await q.acquire("a", CLIENT, max_wait=7, deadline=started + 0.05)
    assert loop.time() - started < 1
    assert caught.value.code == "queue_timeout" and "waited 7 s" in caught.value.message
    q.release(holder)


# ---- rounds and giving up -------------------------------------------------------------------


async def test_abandoned_waits_do_not_push_a_caller_behind_a_heavy_one() -> None:
    # The review's repro: a light caller whose waits were abandoned, one after another, was
    # served 12th behind a heavy caller's backlog; each gives its round back.
    q = queue()
    holder = held(q)
    served = Served(q)
    for n in range(12):
        served.wait("heavy", f"heavy{n}")
    await settle()
    for _ in range(6):
        served.wait("light", "abandoned")
        await settle()
        served.tasks[-1].cancel()
        await settle()
    served.wait("light")
    await settle()
    q.release(holder)
    await settle()
    assert served.order.index("light") == 1
    assert served.order == ["heavy0", "light", *(f"heavy{n}" for n in range(1, 12))]


async def test_waits_abandoned_oldest_first_give_back_every_round() -> None:
    q = queue()
    holder = held(q)
    served = Served(q)
    for n in range(6):
        served.wait("heavy", f"heavy{n}")
    for n in range(3):
        served.wait("light", f"gone{n}")
    await settle()
    for task in served.tasks[6:]:  # in arrival order: each hands its round to the next
        task.cancel()
        await settle()
    served.wait("light")
    await settle()
    q.release(holder)
    await settle()
    assert served.order == ["heavy0", "light", *(f"heavy{n}" for n in range(1, 6))]


async def test_a_wait_abandoned_between_two_keeps_the_later_one_in_its_round() -> None:
    q = queue()
    holder = held(q)
    served = Served(q)
    for n in range(4):
        served.wait("heavy", f"heavy{n}")
    for n in range(3):
        served.wait("light", f"light{n}")
    await settle()
    served.tasks[5].cancel()  # light1: light2 keeps its round, its caller's next one too
    await settle()
    served.wait("light", "light3")
    await settle()
    q.release(holder)
    await settle()
    assert served.order == [
        "heavy0",
        "light0",
        "heavy1",
        "heavy2",
        "light2",
        "heavy3",
        "light3",
    ]


class TestAnIdleCallerComesBackInTheNextRound:
    """An idle caller (nothing waiting, nothing running) starts in the round being served or
    the next: neither behind a backlog for turns it took while nobody else waited, nor ahead
    of the backlog for more than one turn."""

    async def test_turns_taken_while_alone_do_not_keep_it_behind_a_backlog(self) -> None:
        q = queue(slots=2, per_caller=1)
        long = held(q, "long")  # holds the round being served back meanwhile
        for _ in range(20):
            q.release(held(q, "idle"))  # twenty quick answers while nobody waited
        heavy = held(q, "heavy")
        served = Served(q)
        for n in range(5):
            served.wait("heavy", f"heavy{n}")
        await settle()
        for n in range(3):
            served.wait("idle", f"idle{n}")  # back after idling, with a burst
        await settle()
        q.release(heavy)
        await settle()
        # Served within one round, then alternating: it saved no turns either.
        assert served.order == [
            "heavy0",
            "idle0",
            "heavy1",
            "idle1",
            "heavy2",
            "idle2",
            "heavy3",
            "heavy4",
        ]
        q.release(long)

    async def test_a_turn_taken_at_once_after_idling_starts_in_the_next_round(self) -> None:
        q = queue(slots=3, per_caller=2)
        long = held(q, "long")
        for _ in range(20):
            q.release(held(q, "idle"))
        running = held(q, "idle")  # at once, after idling: in the next round, not the 21st
        heavy = held(q, "heavy")
        served = Served(q)
        for n in range(4):
            served.wait("heavy", f"heavy{n}")
        await settle()
        for n in range(2):
            served.wait("idle", f"idle{n}")  # not idle now: after its running turn's round
        await settle()
        q.release(heavy)
        await settle()
        assert served.order == ["heavy0", "heavy1", "idle0", "heavy2", "idle1", "heavy3"]
        q.release(running)
        q.release(long)

    async def test_an_idle_caller_does_not_start_before_the_round_being_served(self) -> None:
        q = queue()
        holder = held(q)
        served = Served(q)
        for n in range(4):
            served.wait("heavy", f"heavy{n}")
        await settle()
        q.release(holder)
        await settle()
        holder = held(q)  # the rounds moved on to 4; "late" never came before
        for n in range(3):
            served.wait("heavy", f"again{n}")
            served.wait("late", f"late{n}")
        await settle()
        q.release(holder)
        await settle()
        assert served.order[4:] == ["again0", "late0", "again1", "late1", "again2", "late2"]


class TestGiveUpsDoNotGrowTheHeap:
    async def test_many_give_ups_leave_the_heap_bounded_and_the_order_right(self) -> None:
        q = queue()
        holder = held(q)
        served = Served(q)
        for n in range(3):
            served.wait(f"stay{n}")
        await settle()
        for n in range(300):
            served.wait(f"flood{n}")
            served.wait("stay0", f"stay0-{n}")
            await settle()
            served.tasks[-1].cancel()
            served.tasks[-2].cancel()
            await settle()
            assert len(q._heads) <= 2 * q.waiting + fair_queue._STALE_SLACK
        await asyncio.gather(*served.tasks[3:], return_exceptions=True)
        assert all(task.cancelled() for task in served.tasks[3:])  # no failure on the way
        assert q.waiting == 3
        q.release(holder)
        await settle()
        assert served.order == ["stay0", "stay1", "stay2"]

    async def test_give_ups_of_a_caller_s_first_waiter_are_bounded_too(self) -> None:
        q = queue(max_waiting=1000, per_client=1000)
        holder = held(q)
        served = Served(q)
        served.wait("other")
        for n in range(200):
            served.wait("a", f"a{n}")
        await settle()
        for task in served.tasks[1:-1]:  # a's first waiter, each time: a new head
            task.cancel()
            await settle()
            assert len(q._heads) <= 2 * 2 + fair_queue._STALE_SLACK
        q.release(holder)
        await settle()
        assert served.order == ["other", "a199"]


async def test_an_idle_caller_s_turn_at_once_starts_in_the_round_being_served() -> None:
    q = queue(slots=2)
    long = held(q, "long")  # round 0, and it holds "now" at 0
    first = held(q, "idle")
    assert first.round == 0  # nothing ahead of now: the clamp leaves it be
    q.release(first)
    for _ in range(5):
        q.release(held(q, "idle"))
    assert held(q, "idle").round == 1  # far ahead, clamped to the next round
    q.release(long)


async def test_a_turn_granted_at_once_by_acquire_counts_in_the_caller_s_rounds() -> None:
    q = queue(slots=2, per_caller=1)
    first = held(q, "a")
    a_waits = asyncio.create_task(q.acquire("a", CLIENT, max_wait=10))
    await settle()
    b_turn = await asyncio.wait_for(q.acquire("b", CLIENT, max_wait=10), 1)  # a free slot
    served = Served(q)
    served.wait("b", "b-again")
    served.wait("c")
    await settle()
    q.release(b_turn)
    await settle()
    assert served.order == ["c", "b-again"]  # b had its turn this round already
    q.release(first)
    q.release(await asyncio.wait_for(a_waits, 1))


async def test_rounds_start_at_zero_and_move_on_as_turns_end() -> None:
    # The rounds themselves, as each turn carries its own: a fresh queue serves round 0, a
    # round ends with its turns, a newcomer starts in the round after the last one ended, and
    # a waiter's turn runs in the round it waited for.
    q = queue(slots=2)
    first = held(q, "a")
    same_round = await q.acquire("b", CLIENT, max_wait=10)  # acquire's own grant at once
    assert (first.round, same_round.round) == (0, 0)
    q.release(first)
    q.release(same_round)
    c_turn, d_turn = held(q, "c"), held(q, "d")
    assert (c_turn.round, d_turn.round) == (1, 1)
    c_waits = asyncio.create_task(q.acquire("c", CLIENT, max_wait=10))  # round 2
    e_waits = asyncio.create_task(q.acquire("e", CLIENT, max_wait=10))  # round 1
    await settle()
    q.release(d_turn)
    e_turn = await asyncio.wait_for(e_waits, 1)
    q.release(c_turn)
    c_again = await asyncio.wait_for(c_waits, 1)
    assert (e_turn.round, c_again.round) == (1, 2)
    q.release(e_turn)
    q.release(c_again)


async def test_a_wait_held_only_by_the_callers_own_cap_says_so() -> None:
    """Slots were free: the caller's own answers held it back, and the busy-LM-Studio advice
    (more generation slots) would not help; the caller's concurrency limit is named."""
    q = queue(slots=3, per_caller=1)
    own = q.try_acquire("key:a")
    assert own is not None
    with pytest.raises(ApiError) as caught:
        await q.acquire("key:a", CLIENT, max_wait=0.05)
    err = caught.value
    assert (err.status, err.code) == (429, "too_many_concurrent_requests")
    assert "at most 1 (limits.concurrent_requests)" in err.message
    assert q.waiting == 0
    q.release(own)


async def test_a_wait_for_a_slot_others_hold_is_the_queue_timeout() -> None:
    q = queue(slots=1, per_caller=1)
    other = q.try_acquire("key:b")
    assert other is not None
    with pytest.raises(ApiError) as caught:
        await q.acquire("key:a", CLIENT, max_wait=0.05)
    assert (caught.value.status, caught.value.code) == (503, "queue_timeout")
    q.release(other)
