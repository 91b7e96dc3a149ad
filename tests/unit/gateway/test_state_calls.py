"""StateCalls: a remote database's calls off the loop, given up on after a bound, and refused at
once while every worker holds an overdue one; a local one's inline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.helpers import LogCapture
from tray_app.errors import StorageError
from tray_app.gateway.state_calls import StateCalls


def _blocking(release: threading.Event, calls: list[str]) -> str:
    calls.append(threading.current_thread().name)
    release.wait(10)
    return "late"


async def no_longer_overdue(state: StateCalls) -> None:
    """Waits (up to 2 s) until the calls given up on have finished on their threads."""
    for _ in range(200):
        if not state.overdue:
            return
        await asyncio.sleep(0.01)


async def test_a_local_database_is_called_inline() -> None:
    state = StateCalls(offload=False)
    assert await state.call(threading.current_thread) is threading.current_thread()


async def test_a_remote_database_is_called_on_a_worker_with_its_arguments() -> None:
    state = StateCalls(offload=True, timeout=5)

    def where(a: int, *, b: int) -> str:
        return f"{a}{b}:{threading.current_thread().name}"

    try:
        assert (await state.call(where, 1, b=2)).startswith("12:lmgate-state")
    finally:
        state.close()


async def test_the_calls_own_errors_come_through_as_they_are() -> None:
    state = StateCalls(offload=True, timeout=5)

    def fails(error: Exception) -> None:
        raise error

    try:
        with pytest.raises(StorageError, match="locked"):
            await state.call(fails, StorageError("locked"))
        # Its own TimeoutError is not the wait's: not told as the database not answering.
        with pytest.raises(TimeoutError, match="its own"):
            await state.call(fails, TimeoutError("its own"))
        assert state.overdue == 0
        assert await state.call(lambda: "after") == "after"
    finally:
        state.close()


async def test_a_call_within_the_bound_is_answered() -> None:
    state = StateCalls(offload=True, timeout=0.5)

    def slow() -> str:
        time.sleep(0.2)
        return "in time"

    try:
        assert await state.call(slow) == "in time"
        assert state.overdue == 0
    finally:
        state.close()


async def test_a_call_past_the_bound_is_given_up_then_every_call_refused_until_it_ends() -> None:
    state = StateCalls(offload=True, timeout=0.2, workers=1)
    release, calls = threading.Event(), list[str]()
    try:
        with LogCapture() as logs:
            started = time.monotonic()
            with pytest.raises(StorageError, match=r"did not answer within 0\.2 s"):
                await state.call(_blocking, release, calls)
            assert 0.2 <= time.monotonic() - started < 1.0
            assert state.overdue == 1
            # Refused at once, and never started: it would only queue behind the first.
            started = time.monotonic()
            for _ in range(3):
                with pytest.raises(StorageError, match="not answering"):
                    await state.call(_blocking, release, calls)
            assert time.monotonic() - started < 0.1
            assert len(calls) == 1
            release.set()
            await no_longer_overdue(state)
            assert state.overdue == 0
            assert await state.call(lambda: "again") == "again"
        said = [r["message"] for r in logs.records()]
        assert said.count("the database did not answer within 0.2 s") == 1
        assert said.count("the database answers again") == 1
    finally:
        release.set()
        state.close()


async def test_a_caller_that_goes_away_leaves_the_call_to_finish() -> None:
    state = StateCalls(offload=True, timeout=5)
    release, done = threading.Event(), threading.Event()

    def write() -> None:
        release.wait(5)
        done.set()

    try:
        waiting = asyncio.ensure_future(state.call(write))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        assert await asyncio.to_thread(done.wait, 5)  # the write was made all the same
        assert state.overdue == 0
    finally:
        release.set()
        state.close()


async def test_closed_workers_are_made_again_on_the_next_call() -> None:
    state = StateCalls(offload=True, timeout=5)
    assert await state.call(lambda: 1) == 1
    state.close()
    assert await state.call(lambda: 2) == 2
    state.close()


async def test_one_overdue_call_holds_one_worker_not_the_others() -> None:
    state = StateCalls(offload=True, timeout=0.2, workers=2)
    release, calls = threading.Event(), list[str]()
    try:
        with pytest.raises(StorageError, match="did not answer"):
            await state.call(_blocking, release, calls)
        assert state.overdue == 1
        assert await state.call(lambda: "served") == "served"  # the other worker
        with pytest.raises(StorageError, match="did not answer"):
            await state.call(_blocking, release, calls)
        assert state.overdue == 2
        with pytest.raises(StorageError, match="not answering"):  # now each is refused
            await state.call(lambda: "never")
    finally:
        release.set()
        state.close()


async def test_a_call_whose_caller_hung_up_counts_when_it_is_overdue() -> None:
    state = StateCalls(offload=True, timeout=0.2, workers=1)
    release, calls = threading.Event(), list[str]()
    try:
        waiting = asyncio.ensure_future(state.call(_blocking, release, calls))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert state.overdue == 0  # not due yet
        await asyncio.sleep(0.3)
        assert state.overdue == 1
        with pytest.raises(StorageError, match="not answering"):
            await state.call(lambda: "never")
        release.set()
        await no_longer_overdue(state)
        assert state.overdue == 0
    finally:
        release.set()
        state.close()


async def test_a_call_still_waiting_for_a_worker_when_due_never_runs() -> None:
    state = StateCalls(offload=True, timeout=0.2, workers=1)
    release, calls = threading.Event(), list[str]()
    try:
        first = asyncio.ensure_future(state.call(_blocking, release, calls))
        await asyncio.sleep(0.05)
        with pytest.raises(StorageError, match="did not answer"):
            await state.call(calls.append, "queued")  # behind the first, on the one worker
        with pytest.raises(StorageError, match="did not answer"):
            await first
        release.set()
        await no_longer_overdue(state)
        await asyncio.sleep(0.05)
        assert calls == ["lmgate-state_0"]  # the queued one was dropped, not run late
    finally:
        release.set()
        state.close()
