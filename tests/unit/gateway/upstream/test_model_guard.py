"""The model guard: a request for a model LM Studio has not loaded never evicts a model others
are receiving answers from, and concurrent first requests load a model once.

LM Studio's model API is played by :class:`MemoryModelApi` (what is on disk, what is loaded,
loads that wait for a test's go); the same guard against the fake LM Studio over a real
socket, streams and all, is in tests/integration/gateway/test_model_api.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.fakes import FakeClock
from tests.memory_model_api import A, B, C, MemoryModelApi
from tray_app.config.settings import ModelSwitch
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.model_guard import (
    LOADING,
    REFRESH_INTERVAL,
    RETRY_AFTER,
    WAITING_FOR_OTHERS,
    WAITING_FOR_SWITCH,
    ModelGuard,
    ModelUse,
)

WAIT = 5.0


def guard_for(
    api: MemoryModelApi,
    policy: ModelSwitch = ModelSwitch.WAIT,
    load_timeout: float = WAIT,
    clock: FakeClock | None = None,
) -> ModelGuard:
    return ModelGuard(api, policy=policy, load_timeout=load_timeout, clock=clock or FakeClock())


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, object]]]:
    """What the event loop reports meanwhile (a task's exception never retrieved, a failing
    callback): the guard's own tasks must leave nothing for it to report."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        yield reported
    finally:
        loop.set_exception_handler(previous)


def code(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return exc.value.status, exc.value.code


class TestLettingThrough:
    async def test_policy_off_asks_lm_studio_nothing(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api, ModelSwitch.OFF)
        use = await guard.enter(B, max_wait=WAIT)
        assert use.model == B
        assert (api.reads, api.loads) == (0, Counter())
        guard.leave(use)

    async def test_off_written_as_plain_text_is_off(self) -> None:
        # Config built by hand (tests, embedders) may carry "off" rather than ModelSwitch.OFF.
        api = MemoryModelApi()
        guard = guard_for(api, "off")  # type: ignore[arg-type]
        guard.leave(await guard.enter(B, max_wait=WAIT))
        assert (api.reads, api.loads) == (0, Counter())

    async def test_no_model_named_asks_lm_studio_nothing(self) -> None:
        api = MemoryModelApi()
        use = await guard_for(api).enter(None, max_wait=WAIT)
        assert use.model is None and api.reads == 0

    async def test_a_server_without_the_model_api_is_not_guarded(self) -> None:
        api = MemoryModelApi()
        api.no_api = True
        guard = guard_for(api)
        busy = await guard.enter(A, max_wait=WAIT)
        await guard.enter(B, max_wait=WAIT)
        assert api.loads == Counter() and guard.loaded_models() == frozenset()
        guard.leave(busy)

    async def test_a_model_lm_studio_does_not_have_goes_on_to_its_404(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        busy = await guard.enter(A, max_wait=WAIT)
        await guard.enter("no-such-model", max_wait=WAIT)
        assert api.loads == Counter()
        guard.leave(busy)

    async def test_lm_studio_unreachable_lets_the_request_say_so(self) -> None:
        api = MemoryModelApi()
        api.read_failure = errors.upstream_unreachable_at("http://127.0.0.1:1234")
        guard = guard_for(api)
        await guard.enter(B, max_wait=WAIT)
        assert api.loads == Counter() and api.reads == 1


class TestWhatIsLoaded:
    async def test_a_loaded_model_enters_at_once_and_counts(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        use = await guard.enter(A, max_wait=WAIT)
        assert guard.loaded_models() == {A}
        assert api.loads == Counter()
        guard.leave(use)

    async def test_a_model_lm_studio_does_not_have_costs_no_read_per_request(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        for _ in range(3):
            guard.leave(await guard.enter("no-such-model", max_wait=WAIT))
        assert api.reads == 1 and api.loads == Counter()

    async def test_nothing_is_known_before_the_first_read(self) -> None:
        assert guard_for(MemoryModelApi()).loaded_models() == frozenset()

    async def test_the_states_are_read_again_only_after_the_interval(self) -> None:
        api = MemoryModelApi()
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        await guard.enter(A, max_wait=WAIT)
        clock.advance(REFRESH_INTERVAL - 0.01)
        await guard.enter(A, max_wait=WAIT)
        assert api.reads == 1
        clock.advance(0.01)
        await guard.enter(A, max_wait=WAIT)
        assert api.reads == 2

    async def test_lm_studio_s_own_unload_is_noticed_after_the_interval(self) -> None:
        api = MemoryModelApi(loaded=(A, B))
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        busy = await guard.enter(A, max_wait=WAIT)
        api.in_memory = {A}  # LM Studio's TTL unloaded B
        clock.advance(REFRESH_INTERVAL)
        with pytest.raises(ApiError) as refused:
            await guard.enter(B, max_wait=0)
        assert code(refused) == (503, "model_busy")
        guard.leave(busy)

    async def test_a_miss_reads_again_at_once(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        busy = await guard.enter(A, max_wait=WAIT)
        api.in_memory = {A, B}  # loaded in LM Studio's window meanwhile
        await guard.enter(B, max_wait=WAIT)
        assert api.reads == 2 and api.loads == Counter()
        assert guard.loaded_models() == {A, B}
        guard.leave(busy)

    async def test_concurrent_requests_share_one_read(self) -> None:
        api = MemoryModelApi()
        api.read_go = asyncio.Event()
        guard = guard_for(api)
        entering = [asyncio.ensure_future(guard.enter(A, max_wait=WAIT)) for _ in range(10)]
        await settle()
        api.read_go.set()
        await asyncio.gather(*entering)
        assert api.reads == 1

    async def test_a_caller_leaving_mid_read_leaves_the_read_to_the_others(self) -> None:
        api = MemoryModelApi()
        api.read_go = asyncio.Event()
        guard = guard_for(api)
        gone = asyncio.ensure_future(guard.enter(A, max_wait=WAIT))
        staying = asyncio.ensure_future(guard.enter(A, max_wait=WAIT))
        await settle()
        gone.cancel()
        await settle()
        api.read_go.set()
        use = await staying
        assert use.model == A and api.reads == 1
        assert gone.cancelled()


class TestSwitching:
    async def test_with_nobody_busy_the_model_is_loaded_then_entered(self) -> None:
        api = MemoryModelApi()
        told: list[str] = []
        guard = guard_for(api)
        use = await guard.enter(B, max_wait=WAIT, notify=told.append)
        assert api.loads == {B: 1} and api.load_timeouts == [WAIT]
        assert guard.loaded_models() == {B}
        assert told == [LOADING]
        guard.leave(use)

    async def test_many_first_requests_load_once(self) -> None:
        api = MemoryModelApi()
        go = api.hold_loads()
        guard = guard_for(api)
        entering = [asyncio.ensure_future(guard.enter(B, max_wait=WAIT)) for _ in range(20)]
        await api.loading.wait()
        await settle()
        go.set()
        uses = await asyncio.gather(*entering)
        assert api.loads == {B: 1}
        assert all(use.model == B for use in uses)

    async def test_a_switch_waits_for_the_other_model_s_answers(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        told: list[str] = []
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT, notify=told.append))
        await settle()
        assert not switching.done() and api.loads == Counter()
        assert told == [WAITING_FOR_OTHERS]
        guard.leave(streaming)
        use = await switching
        assert api.loads == {B: 1} and told == [WAITING_FOR_OTHERS, LOADING]
        guard.leave(use)

    async def test_a_waiting_switch_holds_new_requests_for_the_other_model(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await settle()
        told: list[str] = []
        held = asyncio.ensure_future(guard.enter(A, max_wait=WAIT, notify=told.append))
        await settle()
        assert not held.done(), "a new request for A would keep B waiting for ever"
        assert told == [WAITING_FOR_SWITCH]
        guard.leave(streaming)
        on_b = await switching
        await settle()
        # B evicted A: the held request now waits for B's answer, in its turn.
        assert not held.done() and told == [WAITING_FOR_SWITCH, WAITING_FOR_OTHERS]
        guard.leave(on_b)
        on_a = await held
        assert api.loads == {B: 1, A: 1}
        guard.leave(on_a)

    async def test_a_request_for_the_loaded_model_waits_only_while_a_switch_is_wanted(
        self,
    ) -> None:
        api = MemoryModelApi(loaded=(A,))
        go = api.hold_loads()
        guard = guard_for(api)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        held = asyncio.ensure_future(guard.enter(A, max_wait=WAIT))
        await settle()
        assert not held.done(), "A may be evicted by the load under way"
        api.downloaded.add(A)
        go.set()
        await switching
        await settle()
        assert not held.done(), "B is loaded and A is not: A waits for B's answer"
        held.cancel()

    async def test_switches_are_served_first_come_first(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        to_b = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await settle()
        told: list[str] = []
        to_c = asyncio.ensure_future(guard.enter(C, max_wait=WAIT, notify=told.append))
        await settle()
        guard.leave(streaming)
        on_b = await to_b
        await settle()
        assert not to_c.done() and api.loads == {B: 1}
        # A's answer, then B's load, then B's answer: C waits its turn behind each.
        assert told == [WAITING_FOR_OTHERS, WAITING_FOR_SWITCH]
        guard.leave(on_b)
        on_c = await to_c
        assert api.loads == {B: 1, C: 1}
        guard.leave(on_c)

    async def test_a_model_loaded_meanwhile_is_not_loaded_again(self) -> None:
        """LM Studio answers a load of a loaded model with a second copy."""
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await settle()
        api.in_memory = {A, B}  # someone loaded B in LM Studio's window
        guard.leave(streaming)
        use = await switching
        assert api.loads == Counter()
        guard.leave(use)

    async def test_the_wait_is_bounded(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ApiError) as timed_out:
            await guard.enter(B, max_wait=0.1)
        assert asyncio.get_running_loop().time() - started >= 0.1
        assert code(timed_out) == (503, "model_busy")
        assert timed_out.value.headers["Retry-After"] == str(int(RETRY_AFTER))
        assert timed_out.value.message.startswith(f"{B!r} is not loaded, and others kept")
        assert "for 0.1 s;" in timed_out.value.message
        # Nothing is left behind: A's new requests are not held by a switch nobody wants.
        again = await asyncio.wait_for(guard.enter(A, max_wait=WAIT), 1)
        guard.leave(again)
        guard.leave(streaming)
        assert api.loads == Counter()

    async def test_a_wait_within_its_bound_succeeds(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=0.5))
        await asyncio.sleep(0.2)
        guard.leave(streaming)
        guard.leave(await switching)
        assert api.loads == {B: 1}

    async def test_waking_near_the_deadline_still_times_out(self) -> None:
        api = MemoryModelApi()
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        streaming = await guard.enter(A, max_wait=WAIT)
        other = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=1.0))
        await settle()
        clock.advance(1.0)  # the guard's clock says the wait is over...
        guard.leave(other)  # ...when a wake-up comes
        with pytest.raises(ApiError) as timed_out:
            await switching
        assert code(timed_out) == (503, "model_busy")
        guard.leave(streaming)

    async def test_a_request_held_behind_a_switch_is_bounded_too(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await settle()
        with pytest.raises(ApiError) as timed_out:
            await guard.enter(A, max_wait=0.1)
        assert code(timed_out) == (503, "model_busy")
        assert timed_out.value.message.startswith(f"{A!r} is not loaded")
        assert "for 0.1 s;" in timed_out.value.message
        guard.leave(streaming)
        guard.leave(await switching)

    async def test_a_model_unloaded_under_its_own_answers_is_loaded_without_waiting(
        self,
    ) -> None:
        """Its answers were cut already (LM Studio's TTL, a restart): waiting for them to
        end would wait for nothing."""
        api = MemoryModelApi()
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        cut_off = await guard.enter(A, max_wait=WAIT)
        api.in_memory = set()
        clock.advance(REFRESH_INTERVAL)
        again = await asyncio.wait_for(guard.enter(A, max_wait=WAIT), 1)
        assert api.loads == {A: 1}
        guard.leave(again)
        guard.leave(cut_off)

    async def test_a_switch_loaded_by_someone_else_meanwhile_takes_no_time(self) -> None:
        api = MemoryModelApi()
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        streaming = await guard.enter(A, max_wait=WAIT)
        warming = asyncio.ensure_future(guard.warm_up(B))
        await settle()
        api.in_memory = {A, B}  # the states read a moment ago still say B is not
        guard.leave(streaming)
        assert await warming == 0.0
        assert api.loads == Counter()


class TestRefusing:
    async def test_refuse_answers_at_once_while_another_model_answers(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api, ModelSwitch.REFUSE)
        streaming = await guard.enter(A, max_wait=WAIT)
        with pytest.raises(ApiError) as refused:
            await guard.enter(B, max_wait=WAIT)
        assert code(refused) == (503, "model_busy")
        assert refused.value.message.startswith(f"{B!r} is not loaded, and loading it now")
        assert "models.switch = refuse" in refused.value.message
        assert refused.value.headers["Retry-After"] == str(int(RETRY_AFTER))
        assert api.loads == Counter()
        again = await asyncio.wait_for(guard.enter(A, max_wait=WAIT), 1)
        guard.leave(again)
        guard.leave(streaming)

    async def test_refuse_loads_when_nobody_answers(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api, ModelSwitch.REFUSE)
        guard.leave(await guard.enter(A, max_wait=WAIT))
        use = await guard.enter(B, max_wait=WAIT)
        assert api.loads == {B: 1}
        guard.leave(use)


class TestLoadFailures:
    async def test_a_failed_load_fails_every_waiter_and_the_next_request_tries_again(
        self,
    ) -> None:
        api = MemoryModelApi()
        go = api.hold_loads()
        api.load_failure = errors.model_load_failed(B, "not enough memory")
        guard = guard_for(api)
        entering = [asyncio.ensure_future(guard.enter(B, max_wait=WAIT)) for _ in range(3)]
        await api.loading.wait()
        go.set()
        outcomes = await asyncio.gather(*entering, return_exceptions=True)
        assert all(isinstance(o, ApiError) and o.code == "model_load_failed" for o in outcomes)
        assert api.loads == {B: 1}
        api.load_failure = None
        guard.leave(await guard.enter(B, max_wait=WAIT))
        assert api.loads == {B: 2}

    async def test_after_a_failed_load_what_is_loaded_is_read_again(self) -> None:
        api = MemoryModelApi()
        api.load_failure = errors.model_load_failed(B, "not enough memory")
        guard = guard_for(api)
        guard.leave(await guard.enter(A, max_wait=WAIT))
        reads = api.reads
        with pytest.raises(ApiError) as failed:
            await guard.enter(B, max_wait=WAIT)
        assert failed.value.code == "model_load_failed"
        # Once before the load (a second copy is never asked for), once after it failed.
        assert api.reads == reads + 3

    async def test_a_failed_load_with_lm_studio_gone_says_the_load_s_failure(self) -> None:
        api = MemoryModelApi()
        go = api.hold_loads()
        api.load_failure = errors.model_load_failed(B, "not enough memory")
        guard = guard_for(api)
        entering = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        api.read_failure = errors.upstream_unreachable_at("http://127.0.0.1:1234")
        go.set()
        with pytest.raises(ApiError) as failed:
            await entering
        assert failed.value.message == f"LM Studio could not load {B!r}: not enough memory"

    async def test_a_load_is_bounded(self) -> None:
        api = MemoryModelApi()
        api.hold_loads()
        guard = guard_for(api, load_timeout=0.1)
        with pytest.raises(ApiError) as timed_out:
            await guard.enter(B, max_wait=WAIT)
        assert code(timed_out) == (504, "model_load_timeout")
        assert timed_out.value.message == (
            f"LM Studio did not finish loading {B!r} within 0.1 s (models.load_timeout)."
        )

    async def test_a_load_lm_studio_does_not_show_fails(self) -> None:
        api = MemoryModelApi()
        api.load_forgets = True
        guard = guard_for(api)
        with pytest.raises(ApiError) as failed:
            await guard.enter(B, max_wait=WAIT)
        assert code(failed) == (502, "model_load_failed")
        assert failed.value.message == (
            f"LM Studio could not load {B!r}: it answered that it loaded the model, but does "
            "not list it as loaded"
        )

    async def test_lm_studio_gone_after_its_load_lets_the_request_through(self) -> None:
        # The read's error names the server: it must not become the caller's answer. The
        # states are unknown, so the request goes on and the forwarder says what is wrong.
        api = MemoryModelApi()
        go = api.hold_loads()
        guard = guard_for(api)
        entering = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        api.read_failure = errors.upstream_unreachable_at("http://127.0.0.1:1234")
        go.set()
        use = await entering
        assert use.model == B and api.loads == {B: 1}
        assert guard.loaded_models() == frozenset()
        guard.leave(use)

    async def test_a_warm_up_with_lm_studio_gone_after_its_load_says_how_long(self) -> None:
        api = MemoryModelApi()
        go = api.hold_loads()
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        warming = asyncio.ensure_future(guard.warm_up(B))
        await api.loading.wait()
        clock.advance(3.0)
        api.read_failure = errors.upstream_unreachable_at("http://127.0.0.1:1234")
        go.set()
        assert await warming == 3.0

    async def test_a_failed_read_just_before_the_load_does_not_stop_it(self) -> None:
        api = MemoryModelApi()
        api.failing_reads = {2}  # the read the load makes first
        guard = guard_for(api)
        assert await guard.warm_up(B) == 0.0
        assert api.loads == {B: 1} and guard.loaded_models() == {B}


class TestCancelling:
    async def test_a_caller_gone_while_waiting_leaves_nothing_behind(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await settle()
        switching.cancel()
        await settle()
        # A is not held by a switch nobody wants any more, and B was never counted.
        again = await asyncio.wait_for(guard.enter(A, max_wait=WAIT), 1)
        guard.leave(again)
        guard.leave(streaming)
        guard.leave(await guard.enter(C, max_wait=WAIT))
        assert api.loads == {C: 1}

    async def test_a_caller_gone_mid_load_does_not_cancel_it_for_the_others(self) -> None:
        api = MemoryModelApi()
        go = api.hold_loads()
        guard = guard_for(api)
        gone = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        staying = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        gone.cancel()
        await settle()
        go.set()
        use = await staying
        assert api.loads == {B: 1} and use.model == B
        assert guard.loaded_models() == {B}

    async def test_a_load_nobody_waits_for_any_more_still_finishes(self) -> None:
        api = MemoryModelApi()
        go = api.hold_loads()
        api.load_failure = errors.model_load_failed(B, "no memory")
        guard = guard_for(api)
        gone = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        gone.cancel()
        await settle()
        with loop_errors() as reported:
            go.set()
            await settle()
            gc.collect()  # an unretrieved failure is reported when its task is collected
        assert reported == [], "its failure is retrieved though nobody waits for it"
        api.load_failure = None
        guard.leave(await guard.enter(B, max_wait=WAIT))
        assert api.loads == {B: 2}

    async def test_a_cancelled_load_is_put_away_quietly(self) -> None:
        api = MemoryModelApi()
        api.hold_loads()
        guard = guard_for(api)
        entering = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        with loop_errors() as reported:
            await guard.close()
            await settle()
        assert reported == []
        entering.cancel()

    async def test_a_held_caller_gone_leaves_nothing_behind(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        switching = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await settle()
        held = asyncio.ensure_future(guard.enter(A, max_wait=WAIT))
        await settle()
        held.cancel()
        await settle()
        guard.leave(streaming)
        guard.leave(await switching)  # A's cancelled request was never counted

    async def test_close_stops_a_load_under_way(self) -> None:
        api = MemoryModelApi()
        api.hold_loads()
        guard = guard_for(api)
        entering = asyncio.ensure_future(guard.enter(B, max_wait=WAIT))
        await api.loading.wait()
        await guard.close()
        assert api.loads_ended == 1, "close returns once the load has stopped"
        with pytest.raises(asyncio.CancelledError):
            await entering

    async def test_close_stops_a_read_under_way(self) -> None:
        api = MemoryModelApi()
        api.read_go = asyncio.Event()
        guard = guard_for(api)
        entering = asyncio.ensure_future(guard.enter(A, max_wait=WAIT))
        await settle()
        await guard.close()
        with pytest.raises(asyncio.CancelledError):
            await entering
        api.read_go.set()
        guard.leave(await guard.enter(A, max_wait=WAIT))
        assert api.reads == 2


class TestLeaving:
    async def test_leaving_twice_counts_once(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        first = await guard.enter(A, max_wait=WAIT)
        second = await guard.enter(A, max_wait=WAIT)
        guard.leave(first)
        guard.leave(first)
        with pytest.raises(ApiError):
            await guard.enter(B, max_wait=0.05)  # the second answer from A still runs
        guard.leave(second)
        guard.leave(await guard.enter(B, max_wait=WAIT))

    async def test_an_uncounted_use_leaves_quietly(self) -> None:
        guard = guard_for(MemoryModelApi(), ModelSwitch.OFF)
        use = await guard.enter(A, max_wait=WAIT)
        guard.leave(use)
        waiting = guard_for(MemoryModelApi())
        waiting.leave(ModelUse(A))  # never counted: nothing to take back...
        guard.leave(await waiting.enter(B, max_wait=0.05))  # ...so nothing holds a switch


class TestRestart:
    async def test_lm_studio_restarted_with_nothing_loaded(self) -> None:
        api = MemoryModelApi()
        clock = FakeClock()
        guard = guard_for(api, clock=clock)
        streaming = await guard.enter(A, max_wait=WAIT)
        api.read_failure = errors.upstream_unreachable_at("http://127.0.0.1:1234")
        clock.advance(REFRESH_INTERVAL)
        # While it is down nothing can be known: the request goes on and fails on its own.
        guard.leave(await guard.enter(A, max_wait=WAIT))
        assert guard.loaded_models() == frozenset()
        guard.leave(streaming)  # the restart cut that answer off
        api.read_failure = None
        api.in_memory = set()
        clock.advance(REFRESH_INTERVAL)
        entering = [asyncio.ensure_future(guard.enter(A, max_wait=WAIT)) for _ in range(5)]
        for use in await asyncio.gather(*entering):
            guard.leave(use)
        assert api.loads == {A: 1}


class TestWarmUp:
    async def test_warm_up_loads_and_says_how_long_it_took(self) -> None:
        api = MemoryModelApi()
        clock = FakeClock()
        go = api.hold_loads()
        guard = guard_for(api, clock=clock)
        warming = asyncio.ensure_future(guard.warm_up(B))
        await api.loading.wait()
        clock.advance(12.5)
        go.set()
        assert await warming == 12.5
        assert guard.loaded_models() == {B}
        # Its use is over: a switch back is not kept waiting for it.
        guard.leave(await guard.enter(A, max_wait=0.05))

    async def test_a_loaded_model_warms_up_in_no_time(self) -> None:
        api = MemoryModelApi()
        assert await guard_for(api).warm_up(A) == 0.0
        assert api.loads == Counter()

    async def test_warm_up_reads_lm_studio_afresh(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        await guard.enter(A, max_wait=WAIT)
        api.in_memory = {A, B}
        assert await guard.warm_up(B) == 0.0
        assert api.reads == 2

    async def test_warm_up_with_the_guard_off_still_loads(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api, ModelSwitch.OFF)
        await guard.enter(A, max_wait=WAIT)  # not counted: the guard is off
        await guard.warm_up(B)
        assert api.loads == {B: 1}

    async def test_warm_up_waits_for_the_other_model_s_answers(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        warming = asyncio.ensure_future(guard.warm_up(B))
        await settle()
        assert not warming.done()
        guard.leave(streaming)
        await warming
        assert api.loads == {B: 1}

    async def test_warm_up_under_refuse_is_refused_while_others_answer(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api, ModelSwitch.REFUSE)
        streaming = await guard.enter(A, max_wait=WAIT)
        with pytest.raises(ApiError) as refused:
            await guard.warm_up(B)
        assert refused.value.code == "model_busy"
        guard.leave(streaming)

    async def test_an_unknown_model_cannot_be_warmed_up(self) -> None:
        with pytest.raises(ApiError) as unknown:
            await guard_for(MemoryModelApi()).warm_up("no-such-model")
        assert code(unknown) == (404, "model_not_found")

    async def test_a_server_without_the_model_api_cannot_warm_up(self) -> None:
        api = MemoryModelApi()
        api.no_api = True
        with pytest.raises(ApiError) as failed:
            await guard_for(api).warm_up(B)
        assert code(failed) == (502, "model_load_failed")
        assert failed.value.message == (
            f"LM Studio could not load {B!r}: this server has no model API to load it with "
            "(LM Studio's is needed)"
        )

    async def test_lm_studio_unreachable_is_said(self) -> None:
        api = MemoryModelApi()
        api.read_failure = errors.upstream_unreachable_at("http://127.0.0.1:1234")
        with pytest.raises(ApiError) as failed:
            await guard_for(api).warm_up(B)
        assert failed.value.code == "upstream_unreachable"


class TestTheQueueSeesWhoWaits:
    """``before_waiting`` is how a request waiting here holds its place in the fair queue:
    called once when a wait begins, never when the model may be asked for at once, and
    what it raises ends the wait before it began."""

    async def test_a_loaded_model_enters_without_a_place(self) -> None:
        calls: list[str] = []
        guard = guard_for(MemoryModelApi())
        use = await guard.enter(A, max_wait=WAIT, before_waiting=lambda: calls.append("held"))
        assert calls == []
        guard.leave(use)

    async def test_a_wait_holds_a_place_once_however_many_steps_it_has(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)
        calls: list[str] = []
        told: list[str] = []
        switching = asyncio.ensure_future(
            guard.enter(
                B,
                max_wait=WAIT,
                notify=told.append,
                before_waiting=lambda: calls.append(f"held after {len(told)} told"),
            )
        )
        await settle()
        assert calls == ["held after 0 told"]
        guard.leave(streaming)
        guard.leave(await switching)
        assert told == [WAITING_FOR_OTHERS, LOADING] and calls == ["held after 0 told"]

    async def test_a_load_alone_holds_a_place_too(self) -> None:
        calls: list[str] = []
        guard = guard_for(MemoryModelApi())
        guard.leave(await guard.enter(B, max_wait=WAIT, before_waiting=lambda: calls.append("")))
        assert calls == [""]

    async def test_a_full_queue_ends_the_wait_and_leaves_no_switch_wanted(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        streaming = await guard.enter(A, max_wait=WAIT)

        def full() -> None:
            raise errors.queue_full(False, 1)

        with pytest.raises(ApiError) as caught:
            await guard.enter(B, max_wait=WAIT, before_waiting=full)
        assert code(caught) == (503, "queue_full")
        # B is not wanted any more: a new request for A is not held behind it
        again = await asyncio.wait_for(guard.enter(A, max_wait=WAIT), 1)
        guard.leave(again)
        guard.leave(streaming)
        assert api.loads == Counter()

    async def test_a_refusal_holds_no_place(self) -> None:
        guard = guard_for(MemoryModelApi(), ModelSwitch.REFUSE)
        streaming = await guard.enter(A, max_wait=WAIT)
        calls: list[str] = []
        with pytest.raises(ApiError):
            await guard.enter(B, max_wait=WAIT, before_waiting=lambda: calls.append(""))
        assert calls == []
        guard.leave(streaming)


class TestADraftModel:
    """A body's draft_model (speculative decoding) is a second model LM Studio would load:
    one not loaded is refused, one loaded is counted so that no switch evicts it."""

    async def test_a_loaded_draft_model_is_counted_like_the_model(self) -> None:
        api = MemoryModelApi(loaded=(A, B))
        guard = guard_for(api)
        use = await guard.enter(A, max_wait=WAIT, draft_model=B)
        switching = asyncio.ensure_future(guard.enter(C, max_wait=WAIT))
        await settle()
        assert not switching.done()
        api.in_memory = {A, B}
        guard.leave(use)
        guard.leave(use)  # a second leave counts nothing out
        guard.leave(await asyncio.wait_for(switching, 1))
        assert api.loads == {C: 1}

    async def test_the_draft_alone_keeps_a_switch_waiting(self) -> None:
        guard = guard_for(MemoryModelApi(loaded=(A, B)))
        use = await guard.enter(A, max_wait=WAIT, draft_model=B)
        with pytest.raises(ApiError) as caught:
            await guard.enter(A, max_wait=0.05, draft_model=C)
        assert code(caught) == (503, "model_busy") and repr(C) in caught.value.message
        guard.leave(use)

    async def test_a_draft_model_not_loaded_is_refused_and_the_model_let_go(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        with pytest.raises(ApiError) as caught:
            await guard.enter(A, max_wait=WAIT, draft_model=B)
        assert code(caught) == (503, "model_busy")
        assert caught.value.message.startswith(f"The draft model {B!r} is not loaded")
        assert caught.value.param == "draft_model"
        assert api.loads == Counter()
        # nothing is left counted: a switch goes ahead at once
        guard.leave(await asyncio.wait_for(guard.enter(C, max_wait=WAIT), 1))

    async def test_a_draft_equal_to_the_model_or_unknown_is_not_guarded(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        same = await guard.enter(A, max_wait=WAIT, draft_model=A)
        guard.leave(same)
        unknown = await guard.enter(A, max_wait=WAIT, draft_model="not-on-disk")
        guard.leave(unknown)
        guard.leave(await asyncio.wait_for(guard.enter(C, max_wait=WAIT), 1))

    async def test_a_caller_gone_while_the_draft_is_read_lets_the_model_go(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api)
        guard.leave(await guard.enter(A, max_wait=WAIT))  # what is loaded, read: A alone
        api.in_memory = {A, B}  # loaded since: the draft's check reads again, and waits
        api.read_go = asyncio.Event()
        entering = asyncio.ensure_future(guard.enter(A, max_wait=WAIT, draft_model=B))
        await settle()
        assert api.reads == 2 and not entering.done()
        entering.cancel()
        await settle()
        api.read_go.set()
        await settle()
        assert entering.cancelled()
        guard.leave(await asyncio.wait_for(guard.enter(C, max_wait=WAIT), 1))
        assert api.loads == {C: 1}

    async def test_with_the_guard_off_a_draft_model_is_lms_studio_s_affair(self) -> None:
        api = MemoryModelApi()
        guard = guard_for(api, ModelSwitch.OFF)
        guard.leave(await guard.enter(A, max_wait=WAIT, draft_model=B))
        assert api.reads == 0
