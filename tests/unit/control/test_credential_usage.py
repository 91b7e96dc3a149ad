"""What each credential used lately (issue 17, point 4), read from the real day buckets the
gateway's flush writes: today, this UTC month and the chart's days, for every principal in the
same few queries; and the budgets table as identity's Budget."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tray_app.control.credential_usage import (
    CHART_DAYS,
    NO_RECENT_USAGE,
    RecentUsage,
    budgets,
    recent_usage,
)
from tray_app.identity.principal import Budget
from tray_app.storage.database import DAY, Database, UsageRow


def _at(year: int, month: int, day: int, hour: int = 12) -> float:
    return dt.datetime(year, month, day, hour, tzinfo=dt.UTC).timestamp()


class CountingDatabase(Database):
    """The real database, counting the reads it is asked for."""

    queries = 0

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list:  # type: ignore[type-arg]
        self.queries += 1
        return super().query(sql, params)


@pytest.fixture
def db(tmp_path: Path) -> CountingDatabase:
    return CountingDatabase(tmp_path / "lmgate.db")


def _use(db: Database, principal: str, when: float, prompt: int, completion: int = 0) -> None:
    db.add_usage([UsageRow(principal, 1, prompt, completion, when, int(when) // 3600 * 3600)])


def test_today_this_month_and_the_chart_early_in_a_month(db: CountingDatabase) -> None:
    now = _at(2026, 3, 5)  # the chart reaches back into February
    _use(db, "key:a", _at(2026, 3, 5, 1), 100, 20)
    _use(db, "key:a", _at(2026, 3, 5, 11), 3)
    _use(db, "key:a", _at(2026, 3, 1, 0), 1_000)  # first second's hour of the month
    _use(db, "key:a", _at(2026, 2, 28, 23), 50)  # last month, in the chart
    first_chart_day = _at(2026, 3, 5, 0) - (CHART_DAYS - 1) * DAY
    _use(db, "key:a", first_chart_day, 7)  # the chart's first day
    _use(db, "key:a", first_chart_day - 1, 9_999)  # the day before it: in nothing
    usage = recent_usage(db, now)["key:a"]
    assert (usage.requests_today, usage.tokens_today) == (2, 123)
    assert (usage.requests_month, usage.tokens_month) == (3, 1_123)
    assert len(usage.tokens_per_day) == CHART_DAYS
    assert usage.tokens_per_day[-1] == 123, "today last"
    assert usage.tokens_per_day[-5] == 1_000, "March 1st, four days before"
    assert usage.tokens_per_day[-6] == 50, "February 28th"
    assert usage.tokens_per_day[0] == 7
    assert sum(usage.tokens_per_day) == 123 + 1_000 + 50 + 7


def test_late_in_a_month_the_month_reaches_past_the_chart(db: CountingDatabase) -> None:
    now = _at(2026, 3, 31)
    _use(db, "key:a", _at(2026, 3, 1, 0), 400)  # in the month, before the chart
    _use(db, "key:a", _at(2026, 2, 28), 5)  # neither
    usage = recent_usage(db, now)["key:a"]
    assert (usage.requests_month, usage.tokens_month) == (1, 400)
    assert (usage.requests_today, usage.tokens_today) == (0, 0)
    assert usage.tokens_per_day == (0,) * CHART_DAYS


def test_every_principal_from_one_read_and_none_for_the_unused(db: CountingDatabase) -> None:
    now = _at(2026, 7, 20)
    _use(db, "key:k0", now, 1)
    before = db.queries
    recent_usage(db, now)
    for_one = db.queries - before
    for i in range(1, 30):
        _use(db, f"key:k{i}", now, i + 1)
    before = db.queries
    usage = recent_usage(db, now)
    assert db.queries - before == for_one <= 2, "the same reads for all, not one per credential"
    assert len(usage) == 30 and usage["key:k29"].tokens_today == 30
    assert "key:unused" not in usage
    assert RecentUsage(0, 0, 0, 0, (0,) * CHART_DAYS) == NO_RECENT_USAGE


def test_a_day_ahead_of_the_clock_is_not_counted(db: CountingDatabase) -> None:
    now = _at(2026, 7, 20)
    _use(db, "key:a", now, 10)
    _use(db, "key:a", now + DAY, 500)  # written while the clock ran a day ahead
    usage = recent_usage(db, now)["key:a"]
    assert (usage.tokens_today, usage.tokens_month, sum(usage.tokens_per_day)) == (10, 10, 10)


def test_budgets_by_principal_as_identitys_budget(db: CountingDatabase) -> None:
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO budgets (principal, tokens_per_day, tokens_per_month, updated) "
            "VALUES (?, ?, ?, 0)",
            [("key:a", 50_000, 1_000_000), ("device:b", None, 300_000)],
        )
    assert budgets(db) == {"key:a": Budget(50_000, 1_000_000), "device:b": Budget(None, 300_000)}
    assert budgets(Database(db.path.parent / "other.db")) == {}


def test_a_principal_used_only_last_month_is_charted_with_an_empty_month(
    db: CountingDatabase,
) -> None:
    now = _at(2026, 3, 2)
    _use(db, "key:a", _at(2026, 2, 27), 40)
    usage = recent_usage(db, now)["key:a"]
    assert (usage.requests_month, usage.tokens_month, usage.tokens_today) == (0, 0, 0)
    assert usage.tokens_per_day[-4] == 40
