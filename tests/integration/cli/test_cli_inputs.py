"""What the CLI reads from a person for `--since` and for budgets: the one parser each, then the
commands that use them through the CLI's entry, refusing a bad value with exit code 2 and
writing nothing."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from collections.abc import Callable

import pytest

from tests.integration.cli.in_process import Run, key_id
from tray_app.cli.identity_commands import parse_budget_value
from tray_app.cli.input_errors import InputError
from tray_app.cli.usage_commands import Since, parse_since
from tray_app.config.settings import BUDGET_DEFAULT_MAX
from tray_app.storage.budgets import Budget, BudgetStore
from tray_app.storage.database import DAY, HOUR, KEEP_HOURS_SECONDS, Database, UsageRow
from tray_app.storage.usage_history import Bucket


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


NOW = _at(2026, 12, 2, 1, 17, 42)


class TestParseSince:
    @pytest.mark.parametrize(
        ("raw", "start"),
        [
            ("7d", _at(2026, 11, 25, 1)),  # now - 7 x 24 h, down to its hour
            ("36h", _at(2026, 11, 30, 13)),
            ("90m", _at(2026, 12, 1, 23)),
            ("1w", _at(2026, 11, 25, 1)),
            (" 7D ", _at(2026, 11, 25, 1)),
            ("2026-11-20", _at(2026, 11, 20)),  # a date: its UTC midnight
            ("2026-12-02", _at(2026, 12, 2)),  # today's midnight is not the future
        ],
    )
    def test_a_start_exact_to_the_hour(self, raw: str, start: float) -> None:
        assert parse_since(raw, NOW) == Since(int(start), Bucket.HOUR)

    def test_says_where_it_starts(self) -> None:
        assert parse_since("7d", NOW).words() == "since 2026-11-25 01:00 UTC"

    def test_before_hours_are_kept_it_starts_at_the_day(self) -> None:
        # Hours are purged after 40 days; only whole days reach back further.
        assert parse_since("60d", NOW) == Since(int(_at(2026, 10, 3)), Bucket.DAY)
        assert parse_since("2026-01-01", NOW) == Since(int(_at(2026, 1, 1)), Bucket.DAY)
        last_hour_kept = NOW - KEEP_HOURS_SECONDS + HOUR
        assert parse_since(f"{NOW - last_hour_kept}s", NOW).bucket is Bucket.HOUR
        assert parse_since(f"{NOW - last_hour_kept + 1}s", NOW).bucket is Bucket.DAY

    def test_longer_than_the_epoch_is_all_of_it(self) -> None:
        assert parse_since("1e300d", NOW) == Since(0, Bucket.DAY)

    @pytest.mark.parametrize(
        ("raw", "problem"),
        [
            ("soon", "must be a time ago like 36h or 7d, or a UTC date like 2026-11-20"),
            ("7", "must be a time ago like 36h"),  # seconds or days? a unit is required
            ("", "must be a time ago like 36h"),
            ("-7d", "must be a time ago like 36h"),
            ("0d", "must be a time ago like 36h"),
            ("7y", "must be a time ago like 36h"),
            ("infd", "must be a time ago like 36h"),
            ("2026-11-31", "'2026-11-31' is not a calendar date"),
            ("2026-1-5", "must be a time ago like 36h"),
            ("2026-11-20T00:00", "must be a time ago like 36h"),
            # 2026-11-20 in Arabic-Indic digits
            ("\u0662\u0660\u0662\u0666-\u0661\u0661-\u0662\u0660", "must be a time ago like 36h"),
            ("2026-12-03", "'2026-12-03' is in the future"),
        ],
    )
    def test_a_bad_value_is_refused_naming_the_flag(self, raw: str, problem: str) -> None:
        with pytest.raises(InputError) as refused:
            parse_since(raw, NOW)
        assert refused.value.what == "--since"
        assert problem in refused.value.problem


def _outside_an_hour_change() -> float:
    """Now, not within seconds of an hour's end: the CLI reads the clock again."""
    now = time.time()
    if HOUR - now % HOUR < 5:
        time.sleep(HOUR - now % HOUR + 0.1)
        now = time.time()
    return now


class TestUsageSince:
    def test_totals_from_the_hour_on_with_the_start_in_the_header(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        now = _outside_an_hour_change()
        start = int(now - 36 * HOUR) // HOUR * HOUR
        db().add_usage(
            [
                UsageRow("key:a", 1, 1_000, 0, start - 1, hour=start - HOUR),  # just before
                UsageRow("key:a", 2, 30, 4, start + 1, hour=start),  # the first hour counted
                UsageRow("key:a", 1, 5, 0, now, hour=int(now) // HOUR * HOUR),
            ]
        )
        code, out, err = lmgate("usage", "--since", "36h")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == time.strftime("since %Y-%m-%d %H:%M UTC", time.gmtime(start))
        row = re.search(r"^key:a\s+3\s+35\s+4\s", out, re.M)
        assert row, out
        # Last seen comes from the running totals, the buckets keep no times.
        assert time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now)) in lines[2]

    def test_a_date_counts_from_its_midnight(self, lmgate: Run, db: Callable[[], Database]) -> None:
        now = _outside_an_hour_change()
        today = int(now) // DAY * DAY
        db().add_usage(
            [
                UsageRow("key:a", 1, 700, 0, today - 1, hour=today - HOUR),
                UsageRow("key:a", 1, 8, 0, now, hour=int(now) // HOUR * HOUR),
            ]
        )
        date = time.strftime("%Y-%m-%d", time.gmtime(today))
        code, out, _ = lmgate("usage", "--since", date, "--csv")
        assert code == 0
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [(r["principal"], r["prompt_tokens"]) for r in rows] == [("key:a", "8")]

    def test_the_csv_keeps_its_columns(self, lmgate: Run, db: Callable[[], Database]) -> None:
        now = _outside_an_hour_change()
        db().add_usage([UsageRow("key:a", 1, 8, 0, now, hour=int(now) // HOUR * HOUR)])
        everything = lmgate("usage", "--csv")[1].splitlines()[0]
        assert lmgate("usage", "--csv", "--since", "7d")[1].splitlines()[0] == everything
        by_hour = lmgate("usage", "--csv", "--by", "hour", "--since", "36h")[1]
        assert by_hour.splitlines()[0] == (
            "start,principal,name,kind,requests,prompt_tokens,completion_tokens"
        )

    def test_by_day_says_its_first_day(self, lmgate: Run, db: Callable[[], Database]) -> None:
        now = _outside_an_hour_change()
        start = int(now - 36 * HOUR) // DAY * DAY
        db().add_usage([UsageRow("key:a", 1, 8, 0, start, hour=start)])
        code, out, _ = lmgate("usage", "--by", "day", "--since", "36h")
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == time.strftime("since %Y-%m-%d 00:00 UTC", time.gmtime(start))
        assert lines[2].startswith(time.strftime("%Y-%m-%d 00:00 UTC", time.gmtime(start)))

    @pytest.mark.parametrize("command", [["usage"], ["usage", "--by", "hour"], ["audit"]])
    @pytest.mark.parametrize("raw", ["7", "soon", "2026-02-30", "2999-01-01"])
    def test_a_bad_since_is_a_usage_error_everywhere(
        self, lmgate: Run, command: list[str], raw: str
    ) -> None:
        code, out, err = lmgate(*command, "--since", raw)
        assert (code, out) == (2, "")
        assert err.startswith("lmgate: --since: ")


class TestParseBudgetValue:
    @pytest.mark.parametrize(
        ("raw", "tokens"),
        [
            ("100000", 100_000),
            ("100_000", 100_000),
            ("100,000", 100_000),
            ("1,000,000", 1_000_000),
            ("100k", 100_000),
            ("100K", 100_000),
            ("2M", 2_000_000),
            ("2m", 2_000_000),
            ("1.5k", 1_500),
            (" 50 ", 50),
            ("1", 1),
            (str(BUDGET_DEFAULT_MAX), BUDGET_DEFAULT_MAX),  # the limit itself is allowed
            ("2000M", BUDGET_DEFAULT_MAX),
            ("none", None),
            ("None", None),
            ("NONE", None),
        ],
    )
    def test_accepted(self, raw: str, tokens: int | None) -> None:
        assert parse_budget_value("--day", raw) == tokens


# Each refused value and what the refusal says.
REFUSED = [
    ("0", "must be a positive number of tokens, got 0 (0 would refuse every request"),
    ("0k", "must be a positive number of tokens, got 0"),
    ("-5", "must be a positive number of tokens, got -5"),
    ("-1k", "must be a positive number of tokens, got -1k"),
    (
        str(BUDGET_DEFAULT_MAX + 1),
        "must be at most 2,000,000,000 tokens (as much as the tray's budget fields hold), "
        "got 2,000,000,001",
    ),
    ("3M000", "must be a number of tokens (100000, 100,000, 100k, 2M) or none"),
    ("2001M", "must be at most 2,000,000,000 tokens"),
    ("1.2345k", "must be a whole number of tokens, got '1.2345k'"),
    ("12x", "must be a number of tokens (100000, 100,000, 100k, 2M) or none, got '12x'"),
    ("", "must be a number of tokens"),
    ("1,00", "must be a number of tokens"),
    ("1_", "must be a number of tokens"),
    ("1e5", "must be a number of tokens"),
    ("2G", "must be a number of tokens"),
    ("inf", "must be a number of tokens"),
    ("\u0661\u0660\u0660", "must be a number of tokens"),  # 100 in Arabic-Indic: int() takes it
    ("nothing", "must be a number of tokens"),
]

FLAGS = [
    (("key", "create", "ci"), "--budget-day"),
    (("key", "create", "ci"), "--budget-month"),
    (("token", "create", "bob"), "--budget-day"),
    (("token", "create", "bob"), "--budget-month"),
    (("budget", "set", "alice"), "--day"),
    (("budget", "set", "alice"), "--month"),
]


class TestBudgetValuesRefused:
    @pytest.mark.parametrize(("raw", "problem"), REFUSED)
    def test_by_the_parser(self, raw: str, problem: str) -> None:
        with pytest.raises(InputError) as refused:
            parse_budget_value("--month", raw)
        assert refused.value.what == "--month"
        assert problem in refused.value.problem

    @pytest.mark.parametrize(("command", "flag"), FLAGS)
    @pytest.mark.parametrize(("raw", "problem"), REFUSED)
    def test_by_every_flag_with_nothing_made_or_changed(
        self,
        lmgate: Run,
        db: Callable[[], Database],
        command: tuple[str, ...],
        flag: str,
        raw: str,
        problem: str,
    ) -> None:
        kid = key_id(*lmgate("key", "create", "alice", "--budget-day", "10")[1:])
        code, out, err = lmgate(*command, f"{flag}={raw}")
        assert (code, out) == (2, "")  # no key or token printed
        assert f"lmgate: {flag}: {problem}" in err
        assert BudgetStore(db()).all() == {f"key:{kid}": Budget(10, None)}
        assert [k.split()[1] for k in lmgate("key", "list")[1].splitlines()[1:]] == ["alice"]


class TestBudgetValuesAccepted:
    @pytest.mark.parametrize(("command", "flag"), FLAGS)
    def test_by_every_flag(
        self, lmgate: Run, db: Callable[[], Database], command: tuple[str, ...], flag: str
    ) -> None:
        kid = key_id(*lmgate("key", "create", "alice")[1:])
        code, _, err = lmgate(*command, flag, "2M")
        assert code == 0, err
        stored = set(BudgetStore(db()).all().values())
        assert stored in ({Budget(2_000_000, None)}, {Budget(None, 2_000_000)}), stored
        if command[0] == "budget":
            code, _, _ = lmgate(*command, flag, "none")
            assert code == 0 and BudgetStore(db()).get(f"key:{kid}") is None

    def test_none_at_creation_is_no_budget(self, lmgate: Run, db: Callable[[], Database]) -> None:
        assert lmgate("key", "create", "ci", "--budget-day", "none")[0] == 0
        assert BudgetStore(db()).all() == {}
