"""The budget ledger over a real database, recorder and usage history: admission at the edge
of each period, settling, restarts, and the day and month boundaries."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock
from tray_app.errors import StorageError
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.budgets import BudgetLedger, Reservation
from tray_app.gateway.state_calls import StateCalls
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import SCOPE_CHAT, Budget, Principal
from tray_app.storage.database import Database, UsageRow
from tray_app.storage.usage_history import Bucket, Totals, UsageHistory

NAME = "key:k1"
START = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC).timestamp()
MIDNIGHT = dt.datetime(2027, 1, 16, tzinfo=dt.UTC).timestamp()
FEBRUARY = dt.datetime(2027, 2, 1, tzinfo=dt.UTC).timestamp()


def principal(day: int | None = None, month: int | None = None, name: str = NAME) -> Principal:
    return Principal(name, frozenset({SCOPE_CHAT}), budget=Budget(day, month))


@dataclass
class Rig:
    db: Database
    clock: FakeClock
    recorder: UsageRecorder
    ledger: BudgetLedger

    def restart(self) -> BudgetLedger:
        """A new process over the same database: what the old one counted is flushed."""
        assert self.recorder.flush()
        self.recorder = UsageRecorder(self.db, self.clock)
        self.ledger = new_ledger(self.db, self.clock, self.recorder)
        return self.ledger

    def finish(
        self, reservation: Reservation | None, used: Usage | None, bytes_out: int = 0
    ) -> None:
        """What the gateway does when a request ends: settle and record in one step."""
        if reservation is not None:
            self.ledger.settle(reservation, used, bytes_out=bytes_out)
        self.recorder.record(NAME if reservation is None else reservation.principal, used)


def new_ledger(db: Database, clock: FakeClock, recorder: UsageRecorder) -> BudgetLedger:
    return BudgetLedger(UsageHistory(db), clock, pending=recorder.pending_tokens)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    db = Database(tmp_path / "lmgate.db")
    clock = FakeClock(START)
    recorder = UsageRecorder(db, clock)
    yield Rig(db, clock, recorder, new_ledger(db, clock, recorder))
    db.close()


def refusal(rig: Rig, who: Principal, prompt: int, output: int | None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        rig.ledger.reserve(who, prompt_estimate=prompt, requested_output=output)
    assert caught.value.status == 429
    assert caught.value.code == "budget_exceeded"
    return caught.value


class TestNothingToTrack:
    def test_no_budget(self, rig: Rig) -> None:
        who = Principal(NAME, frozenset({SCOPE_CHAT}))
        assert rig.ledger.reserve(who, prompt_estimate=10**9, requested_output=None) is None
        assert rig.ledger.principals_tracked == 0

    def test_a_budget_without_limits(self, rig: Rig) -> None:
        assert rig.ledger.reserve(principal(), prompt_estimate=10**9, requested_output=1) is None


class TestRequestedOutput:
    def test_fits_exactly_at_the_edge(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=400, requested_output=600)
        assert r is not None
        assert (r.principal, r.tokens, r.max_output) == (NAME, 1000, None)

    def test_one_token_over_the_edge_is_refused(self, rig: Rig) -> None:
        error = refusal(rig, principal(day=1000), 400, 601)
        assert "1,001 tokens" in error.message
        assert "1,000 of your 1,000 for this day are left" in error.message
        assert "2027-01-16 00:00 UTC" in error.message
        assert error.headers["Retry-After"] == str(16 * 3600)

    def test_reservations_in_flight_count(self, rig: Rig) -> None:
        who = principal(day=1000)
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=700) is not None
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=300) is not None
        error = refusal(rig, who, 0, 1)
        assert "is used up" in error.message

    def test_other_principals_have_their_own_budget(self, rig: Rig) -> None:
        assert rig.ledger.reserve(principal(day=10), prompt_estimate=0, requested_output=10)
        other = principal(day=10, name="key:k2")
        assert rig.ledger.reserve(other, prompt_estimate=0, requested_output=10) is not None

    def test_negative_estimates_reserve_nothing_negative(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=10), prompt_estimate=-5, requested_output=-5)
        assert r is not None
        assert r.tokens == 0
        assert rig.ledger.status(NAME, Budget(10)).in_flight == 0


class TestChosenCap:
    def test_the_ledger_caps_the_output_at_what_is_left(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=300, requested_output=None)
        assert r is not None
        assert (r.tokens, r.max_output) == (1000, 700)

    def test_room_for_one_token_is_enough(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=999, requested_output=None)
        assert r is not None
        assert r.max_output == 1

    def test_no_room_for_one_token_is_refused(self, rig: Rig) -> None:
        error = refusal(rig, principal(day=1000), 1000, None)
        assert "about 1,001 tokens, and 1,000 of your 1,000" in error.message

    def test_the_tighter_period_sets_the_cap(self, rig: Rig) -> None:
        who = principal(day=1000, month=500)
        r = rig.ledger.reserve(who, prompt_estimate=100, requested_output=None)
        assert r is not None
        assert r.max_output == 400
        who = principal(day=300, month=500, name="key:k2")
        r = rig.ledger.reserve(who, prompt_estimate=100, requested_output=None)
        assert r is not None
        assert r.max_output == 200


class TestWhichPeriodIsNamed:
    def test_the_month_when_it_is_short(self, rig: Rig) -> None:
        # Both are short; waiting for the day's reset would not help.
        error = refusal(rig, principal(day=100, month=100), 0, 101)
        assert "for this month" in error.message
        assert "2027-02-01 00:00 UTC" in error.message
        assert error.headers["Retry-After"] == str(int(FEBRUARY - START))

    def test_the_day_when_only_it_is_short(self, rig: Rig) -> None:
        error = refusal(rig, principal(day=100, month=10_000), 0, 101)
        assert "for this day" in error.message
        assert error.headers["Retry-After"] == str(int(MIDNIGHT - START))

    def test_the_month_alone(self, rig: Rig) -> None:
        assert rig.ledger.reserve(principal(month=100), prompt_estimate=0, requested_output=60)
        error = refusal(rig, principal(month=100), 40, None)
        assert "about 41 tokens, and 40 of your 100 for this month are left" in error.message


class TestSettle:
    def test_real_usage_replaces_the_reservation(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=100, requested_output=900)
        rig.finish(r, Usage(120, 30))
        status = rig.ledger.status(NAME, Budget(1000))
        assert (status.day_used, status.month_used, status.in_flight) == (150, 150, 0)
        assert rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=850)

    def test_twice_counts_once(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=10, requested_output=90)
        assert r is not None
        rig.ledger.settle(r, Usage(10, 20))
        rig.ledger.settle(r, Usage(10, 20))
        status = rig.ledger.status(NAME, Budget(1000))
        assert (status.day_used, status.in_flight) == (30, 0)

    def test_equal_reservations_are_settled_one_each(self, rig: Rig) -> None:
        first = rig.ledger.reserve(principal(day=1000), prompt_estimate=10, requested_output=90)
        second = rig.ledger.reserve(principal(day=1000), prompt_estimate=10, requested_output=90)
        assert first == second
        assert first is not None and second is not None
        rig.ledger.settle(first, Usage(10, 20))
        rig.ledger.settle(second, Usage(10, 20))
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 60

    def test_nothing_came_back_charges_nothing(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=100, requested_output=500)
        assert r is not None
        rig.ledger.settle(r, None, bytes_out=0)
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 0

    def test_a_stream_cut_short_is_charged_by_its_bytes(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=100, requested_output=500)
        assert r is not None
        rig.ledger.settle(r, None, bytes_out=1099)
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 110

    def test_the_estimate_never_passes_the_cap(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=100, requested_output=None)
        assert r is not None
        rig.ledger.settle(r, None, bytes_out=10**9)
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 1000

    def test_usage_above_the_reservation_leaves_no_negative_room(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=100), prompt_estimate=10, requested_output=10)
        rig.finish(r, Usage(80, 70))  # the estimate was wrong
        error = refusal(rig, principal(day=100), 0, 1)
        assert "is used up" in error.message
        assert rig.ledger.status(NAME, Budget(100)).day_used == 150


class TestStoredTotals:
    def test_a_restart_continues_from_the_database(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=600)
        rig.finish(r, Usage(400, 200))
        ledger = rig.restart()
        assert ledger.status(NAME, Budget(1000)).day_used == 600
        assert ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=400)
        refusal(rig, principal(day=1000), 0, 1)

    def test_counted_but_not_flushed_counts(self, rig: Rig) -> None:
        rig.recorder.record(NAME, Usage(300, 300))  # before this principal had a budget
        refusal(rig, principal(day=1000), 0, 401)
        assert rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=400)

    def test_a_flush_does_not_count_twice(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=500)
        rig.finish(r, Usage(250, 250))
        assert rig.recorder.flush()
        assert rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=500)

    def test_the_database_is_read_once_per_period(self, rig: Rig) -> None:
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 0
        rig.db.add_usage([UsageRow(NAME, 1, 500, 0, START, int(START) // 3600 * 3600)])
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 0
        assert rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=1000)

    def test_usage_while_it_had_no_budget_counts_when_it_has_one_again(self, rig: Rig) -> None:
        rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=0)
        unlimited = Principal(NAME, frozenset({SCOPE_CHAT}))
        assert rig.ledger.reserve(unlimited, prompt_estimate=0, requested_output=None) is None
        rig.recorder.record(NAME, Usage(700, 0))
        refusal(rig, principal(day=1000), 0, 301)

    def test_the_month_counts_earlier_days(self, rig: Rig) -> None:
        earlier = int(START) - 3 * 86400
        rig.db.add_usage([UsageRow(NAME, 1, 900, 0, earlier, earlier // 3600 * 3600)])
        status = rig.ledger.status(NAME, Budget(1000, 1000))
        assert (status.day_used, status.month_used) == (0, 900)
        refusal(rig, principal(day=1000, month=1000), 0, 101)

    def test_last_month_does_not_count(self, rig: Rig) -> None:
        december = int(dt.datetime(2026, 12, 31, 23, tzinfo=dt.UTC).timestamp())
        rig.db.add_usage([UsageRow(NAME, 1, 900, 0, december, december)])
        assert rig.ledger.status(NAME, Budget(1000, 1000)).month_used == 0


class TestBoundaries:
    def test_a_new_day_starts_empty_and_the_month_goes_on(self, rig: Rig) -> None:
        who = principal(day=1000, month=1500)
        rig.finish(
            rig.ledger.reserve(who, prompt_estimate=0, requested_output=1000), Usage(0, 1000)
        )
        refusal(rig, who, 0, 1)
        rig.clock.advance(MIDNIGHT - START)
        status = rig.ledger.status(NAME, Budget(1000, 1500))
        assert (status.day_used, status.month_used) == (0, 1000)
        assert status.day_resets_at == MIDNIGHT + 86400
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=500)
        error = refusal(rig, who, 0, 1)
        assert "for this month" in error.message

    def test_one_second_before_midnight_is_still_today(self, rig: Rig) -> None:
        who = principal(day=1000)
        rig.finish(
            rig.ledger.reserve(who, prompt_estimate=0, requested_output=1000), Usage(0, 1000)
        )
        rig.clock.advance(MIDNIGHT - START - 1)
        error = refusal(rig, who, 0, 1)
        assert error.headers["Retry-After"] == "1"
        rig.clock.advance(1)
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=1000)

    def test_a_new_month_starts_empty(self, rig: Rig) -> None:
        who = principal(month=1000)
        rig.finish(
            rig.ledger.reserve(who, prompt_estimate=0, requested_output=1000), Usage(0, 1000)
        )
        rig.clock.advance(FEBRUARY - START - 1)
        refusal(rig, who, 0, 1)
        rig.clock.advance(1)
        status = rig.ledger.status(NAME, Budget(None, 1000))
        assert status.month_resets_at == dt.datetime(2027, 3, 1, tzinfo=dt.UTC).timestamp()
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=1000)

    def test_a_request_running_at_midnight_holds_its_tokens_in_the_new_day(self, rig: Rig) -> None:
        who = principal(day=1000)
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=800)
        rig.clock.advance(MIDNIGHT - START)
        refusal(rig, who, 0, 201)
        assert rig.ledger.reserve(who, prompt_estimate=0, requested_output=200)

    def test_it_counts_in_the_day_it_ends_in(self, rig: Rig) -> None:
        who = principal(day=1000, month=10_000)
        running = rig.ledger.reserve(who, prompt_estimate=0, requested_output=800)
        rig.clock.advance(MIDNIGHT - START)
        rig.finish(running, Usage(0, 600))  # settled before anything reserved today
        status = rig.ledger.status(NAME, Budget(1000, 10_000))
        assert (status.day_used, status.month_used, status.in_flight) == (600, 600, 0)
        assert rig.restart().status(NAME, Budget(1000, 10_000)).day_used == 600

    def test_ended_after_a_reservation_today_counts_today_too(self, rig: Rig) -> None:
        who = principal(day=1000)
        running = rig.ledger.reserve(who, prompt_estimate=0, requested_output=500)
        rig.clock.advance(MIDNIGHT - START)
        rig.ledger.reserve(who, prompt_estimate=0, requested_output=100)
        rig.finish(running, Usage(0, 300))
        status = rig.ledger.status(NAME, Budget(1000))
        assert (status.day_used, status.in_flight) == (300, 100)


class TestMemory:
    def test_principals_idle_at_a_new_day_are_forgotten(self, rig: Rig) -> None:
        idle = rig.ledger.reserve(
            principal(day=10, name="key:idle"), prompt_estimate=0, requested_output=1
        )
        assert idle is not None
        rig.ledger.settle(idle, Usage(0, 1))
        running = rig.ledger.reserve(principal(day=10), prompt_estimate=0, requested_output=1)
        assert rig.ledger.principals_tracked == 2
        rig.clock.advance(MIDNIGHT - START)
        rig.ledger.status("key:other", Budget(10))
        assert rig.ledger.principals_tracked == 2  # the running one and the one just asked about
        rig.finish(running, Usage(0, 1))
        assert rig.ledger.principals_tracked == 1

    def test_a_principal_without_a_budget_is_forgotten(self, rig: Rig) -> None:
        rig.ledger.status(NAME, Budget(10))
        rig.ledger.reserve(Principal(NAME, frozenset()), prompt_estimate=0, requested_output=None)
        assert rig.ledger.principals_tracked == 0

    def test_a_reservation_of_nothing_forgotten_meanwhile_settles_quietly(self, rig: Rig) -> None:
        nothing = rig.ledger.reserve(principal(day=10), prompt_estimate=0, requested_output=0)
        assert nothing is not None
        rig.ledger.reserve(Principal(NAME, frozenset()), prompt_estimate=0, requested_output=None)
        rig.finish(nothing, Usage(3, 4))
        assert rig.ledger.principals_tracked == 0
        assert rig.ledger.status(NAME, Budget(10)).day_used == 7  # from the recorder


class TestARefusalSaysWhatFits:
    """A cap too large for what is left is told the largest that fits (what every period has
    left, less the prompt estimate), so the caller can retry at once instead of waiting."""

    def test_the_largest_cap_that_fits(self, rig: Rig) -> None:
        error = refusal(rig, principal(day=1000), 400, 601)
        assert "lower max_tokens (or max_output_tokens) to 600 or less" in error.message
        assert "resets at 2027-01-16 00:00 UTC" in error.message
        assert error.headers["Retry-After"] == str(16 * 3600)
        assert rig.ledger.reserve(principal(day=1000), prompt_estimate=400, requested_output=600)

    def test_the_tighter_period_decides_it(self, rig: Rig) -> None:
        # Both short: the month is named (its reset is later), the day has less left.
        error = refusal(rig, principal(day=250, month=300), 50, 300)
        assert "for this month" in error.message and "to 200 or less" in error.message
        error = refusal(rig, principal(day=300, month=250, name="key:k2"), 50, 300)
        assert "for this month" in error.message and "to 200 or less" in error.message
        error = refusal(rig, principal(day=300, month=10_000, name="key:k3"), 50, 300)
        assert "for this day" in error.message and "to 250 or less" in error.message

    def test_room_for_one_token_is_offered(self, rig: Rig) -> None:
        error = refusal(rig, principal(day=10), 9, 2)
        assert "lower max_tokens (or max_output_tokens) to 1 or less" in error.message

    def test_no_room_for_one_token_offers_nothing(self, rig: Rig) -> None:
        for prompt in (10, 11):
            error = refusal(rig, principal(day=10), prompt, 1)
            assert "lower max_tokens" not in error.message
            assert "resets at" in error.message

    def test_a_budget_used_up_offers_nothing(self, rig: Rig) -> None:
        assert rig.ledger.reserve(principal(day=10), prompt_estimate=0, requested_output=10)
        error = refusal(rig, principal(day=10), 0, 1)
        assert "is used up" in error.message and "lower max_tokens" not in error.message

    def test_a_cap_the_ledger_chose_offers_nothing(self, rig: Rig) -> None:
        error = refusal(rig, principal(day=10), 10, None)
        assert "lower max_tokens" not in error.message


class TestAPromptReportedAsNothing:
    """Every generation reads at least its chat template: a usage with no prompt (a usage
    event the gateway saw only half of) is charged the prompt estimate, never nothing."""

    def test_a_zero_prompt_is_charged_the_estimate(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=40, requested_output=100)
        assert r is not None
        assert rig.ledger.settle(r, Usage(0, 15)) == Usage(40, 15)
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 55

    def test_a_negative_prompt_too(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=40, requested_output=100)
        assert r is not None
        assert rig.ledger.settle(r, Usage(-3, 15)) == Usage(40, 15)

    def test_a_prompt_of_one_is_lm_studio_s_word(self, rig: Rig) -> None:
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=40, requested_output=100)
        assert r is not None
        assert rig.ledger.settle(r, Usage(1, 15)) == Usage(1, 15)
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 16

    def test_without_an_estimate_zero_stays_zero(self, rig: Rig) -> None:
        # Nothing estimated (an empty prompt): nothing to put in its place.
        r = rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=100)
        assert r is not None
        assert rig.ledger.settle(r, Usage(0, 15)) == Usage(0, 15)


class TestWhatIsLeft:
    """``left`` is what a request may still reserve: the tightest limited period's room, less
    what requests running now hold (the default output cap is cut from it)."""

    @pytest.mark.parametrize(
        ("day", "month", "expected"),
        [
            (100, None, 100 - 30 - 20),
            (None, 80, 80 - 30 - 20),
            (100, 60, 60 - 30 - 20),
            (50, 500, 50 - 30 - 20),
        ],
    )
    def test_the_tightest_period_less_what_runs(
        self, rig: Rig, day: int | None, month: int | None, expected: int
    ) -> None:
        who = principal(day=day, month=month)
        rig.finish(rig.ledger.reserve(who, prompt_estimate=10, requested_output=20), Usage(10, 20))
        running = rig.ledger.reserve(who, prompt_estimate=5, requested_output=15)
        assert running is not None and running.tokens == 20
        assert rig.ledger.left(NAME, who.budget or Budget()) == expected
        rig.ledger.settle(running, Usage(5, 15))
        assert rig.ledger.left(NAME, who.budget or Budget()) == expected + 20 - 20


class CountingHistory(UsageHistory):
    """The real history, telling which thread each read was made on."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.reads: list[str] = []
        self.broken = False

    def totals_since(self, principal: str, since: float, bucket: Bucket = Bucket.DAY) -> Totals:
        if self.broken:
            raise StorageError("the database cannot be read")
        self.reads.append(threading.current_thread().name)
        return super().totals_since(principal, since, bucket)


class TestLoadedOffTheLoop:
    """With a remote database the gateway loads a caller's stored use through StateCalls before
    admitting it, so the reserve that follows reads nothing on the loop."""

    @pytest.fixture
    def history(self, rig: Rig) -> CountingHistory:
        history = CountingHistory(rig.db)
        rig.ledger = BudgetLedger(history, rig.clock, pending=rig.recorder.pending_tokens)
        return history

    async def test_the_day_and_month_are_read_on_a_worker_then_reserve_reads_nothing(
        self, rig: Rig, history: CountingHistory
    ) -> None:
        earlier = int(START) - 3 * 86400
        rig.db.add_usage(
            [
                UsageRow(NAME, 1, 300, 0, earlier, earlier // 3600 * 3600),
                UsageRow(NAME, 1, 200, 0, START, int(START) // 3600 * 3600),
            ]
        )
        rig.recorder.record(NAME, Usage(100, 0))  # counted, not flushed: counts too
        state = StateCalls(offload=True, timeout=5)
        try:
            await rig.ledger.load(principal(day=1000, month=1000), state)
            await rig.ledger.load(principal(day=1000, month=1000), state)  # once only
        finally:
            state.close()
        assert len(history.reads) == 2
        assert all(name.startswith("lmgate-state") for name in history.reads)
        status = rig.ledger.status(NAME, Budget(1000, 1000))
        assert (status.day_used, status.month_used) == (300, 600)
        refusal(rig, principal(day=1000, month=1000), 0, 401)
        assert rig.ledger.reserve(
            principal(day=1000, month=1000), prompt_estimate=0, requested_output=400
        )
        assert len(history.reads) == 2

    async def test_midnight_during_the_read_reads_the_new_day_off_the_loop_too(
        self, rig: Rig, history: CountingHistory
    ) -> None:
        rig.clock.advance(MIDNIGHT - 1 - START)
        rig.db.add_usage([UsageRow(NAME, 1, 300, 0, START, int(START) // 3600 * 3600)])
        clock = rig.clock

        class MidnightMeanwhile(StateCalls):
            async def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                if clock.time() < MIDNIGHT:
                    clock.advance(11)  # the read took us past midnight
                return await super().call(fn, *args, **kwargs)

        state = MidnightMeanwhile(offload=True, timeout=5)
        try:
            await rig.ledger.load(principal(day=1000), state)
        finally:
            state.close()
        assert len(history.reads) == 4  # the day that ended, then the new one
        assert all(name.startswith("lmgate-state") for name in history.reads)
        status = rig.ledger.status(NAME, Budget(1000))
        assert (status.day_used, status.day_resets_at) == (0, MIDNIGHT + 86400)
        assert rig.ledger.reserve(principal(day=1000), prompt_estimate=0, requested_output=1000)
        assert len(history.reads) == 4  # nothing read on the loop

    async def test_a_new_day_is_read_again(self, rig: Rig, history: CountingHistory) -> None:
        state = StateCalls(offload=False)
        await rig.ledger.load(principal(day=1000), state)
        rig.clock.advance(MIDNIGHT - START)
        await rig.ledger.load(principal(day=1000), state)
        assert len(history.reads) == 4

    async def test_no_budget_reads_nothing(self, rig: Rig, history: CountingHistory) -> None:
        state = StateCalls(offload=False)
        await rig.ledger.load(Principal(NAME, frozenset({SCOPE_CHAT})), state)
        await rig.ledger.load(principal(), state)  # a budget with no limit
        assert history.reads == []

    async def test_a_database_that_does_not_answer_is_a_storage_error(
        self, rig: Rig, history: CountingHistory
    ) -> None:
        state = StateCalls(offload=True, timeout=5)
        history.broken = True
        try:
            with pytest.raises(StorageError):
                await rig.ledger.load(principal(day=1000), state)
        finally:
            state.close()
        # Nothing half-loaded: the next read asks again.
        history.broken = False
        assert rig.ledger.status(NAME, Budget(1000)).day_used == 0
        assert history.reads == ["MainThread"] * 2  # the day and the month
