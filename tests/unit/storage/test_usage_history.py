"""Reading the usage buckets: totals per principal from an hour or a day on, the current day and
month in one read, and which bucket still reaches back to a start, on the real database the
gateway's flush writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from tray_app.storage.database import DAY, HOUR, KEEP_HOURS_SECONDS, Database, UsageRow
from tray_app.storage.usage_history import (
    Bucket,
    Current,
    Totals,
    UsageHistory,
    bucket_start,
    finest_bucket,
)


def _at(year: int, month: int, day: int, hour: int = 12, minute: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each test on SQLite and on a real PostgreSQL (tests.postgres_server)."""
    database: Database
    if request.param == "postgres":
        from tray_app.storage.postgres import PostgresDatabase

        database = PostgresDatabase.connect(request.getfixturevalue("postgres_url"))
    else:
        database = Database(tmp_path / "lmgate.db")
    yield database
    database.close()


def _use(db: Database, principal: str, when: float, prompt: int, completion: int = 0) -> None:
    db.add_usage([UsageRow(principal, 1, prompt, completion, when, int(when) // HOUR * HOUR)])


class TestPerPrincipal:
    def test_from_an_hour_on_leaves_out_the_hour_before(self, db: Database) -> None:
        _use(db, "key:a", _at(2026, 11, 25, 0, 59), 100)
        _use(db, "key:a", _at(2026, 11, 25, 1, 0), 10, 1)
        _use(db, "key:b", _at(2026, 11, 25, 1, 30), 5)
        since = _at(2026, 11, 25, 1, 0)
        assert UsageHistory(db).per_principal(since, Bucket.HOUR) == {
            "key:a": Totals(1, 10, 1),
            "key:b": Totals(1, 5, 0),
        }

    def test_a_start_inside_an_hour_counts_that_whole_hour(self, db: Database) -> None:
        _use(db, "key:a", _at(2026, 11, 25, 1, 5), 10)
        since = _at(2026, 11, 25, 1, 40)
        assert UsageHistory(db).per_principal(since, Bucket.HOUR) == {"key:a": Totals(1, 10, 0)}

    def test_by_day_by_default_from_the_start_of_its_day(self, db: Database) -> None:
        _use(db, "key:a", _at(2026, 11, 24, 23), 100)
        _use(db, "key:a", _at(2026, 11, 25, 0), 10)
        assert UsageHistory(db).per_principal(_at(2026, 11, 25, 18)) == {"key:a": Totals(1, 10, 0)}


class TestCurrent:
    def test_today_and_this_month_for_every_principal(self, db: Database) -> None:
        now = _at(2026, 11, 25, 13)
        _use(db, "key:a", _at(2026, 11, 25, 1), 100, 20)
        _use(db, "key:a", _at(2026, 11, 1, 0), 1_000)  # the month's first hour
        _use(db, "key:a", _at(2026, 10, 31, 23), 50_000)  # last month: in neither
        _use(db, "key:b", _at(2026, 11, 24, 23), 7)  # yesterday: this month only
        assert UsageHistory(db).current(now) == {
            "key:a": Current(Totals(1, 100, 20), Totals(2, 1_100, 20)),
            "key:b": Current(Totals(), Totals(1, 7, 0)),
        }

    def test_a_day_ahead_of_the_clock_is_in_neither(self, db: Database) -> None:
        now = _at(2026, 11, 25, 13)
        _use(db, "key:a", now + DAY, 500)
        assert UsageHistory(db).current(now) == {}

    def test_nothing_used_is_nobody(self, db: Database) -> None:
        assert UsageHistory(db).current(_at(2026, 11, 25)) == {}


class TestFinestBucket:
    def test_hours_while_they_are_kept_then_days(self) -> None:
        now = _at(2026, 11, 25, 13, 20)
        assert finest_bucket(now - 7 * DAY, now) is Bucket.HOUR
        kept = now - KEEP_HOURS_SECONDS + HOUR
        assert finest_bucket(kept, now) is Bucket.HOUR
        assert finest_bucket(kept - 1, now) is Bucket.DAY

    def test_bucket_start_rounds_down(self) -> None:
        when = _at(2026, 11, 25, 13, 20)
        assert bucket_start(when, Bucket.HOUR) == _at(2026, 11, 25, 13)
        assert bucket_start(when, Bucket.DAY) == _at(2026, 11, 25, 0)
