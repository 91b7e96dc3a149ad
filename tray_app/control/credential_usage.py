"""What each credential used lately, for the Devices window: today, this month and a short
series of tokens per day, with its budget. Read for all principals at once (two queries over
the day buckets, one over the budgets), however many credentials there are.

Days and months are UTC, as budgets count them, so "today" here is the day a budget resets on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tray_app.identity.principal import Budget
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.database import DAY, Database
from tray_app.storage.usage_history import Bucket, Current, UsageHistory, day_start

CHART_DAYS = 14  # two weeks shows a weekly rhythm and still fits a table cell


@dataclass(frozen=True, slots=True)
class RecentUsage:
    requests_today: int = 0
    tokens_today: int = 0
    requests_month: int = 0
    tokens_month: int = 0
    # Tokens per UTC day, oldest first, today last; CHART_DAYS of them.
    tokens_per_day: tuple[int, ...] = (0,) * CHART_DAYS


NO_RECENT_USAGE = RecentUsage()


def recent_usage(db: Database, now: float) -> dict[str, RecentUsage]:
    """Every principal with usage this month or in the chart's days."""
    history = UsageHistory(db)
    today = day_start(now)
    first_chart_day = today - (CHART_DAYS - 1) * DAY
    series: dict[str, list[int]] = {}
    for row in history.series(first_chart_day, Bucket.DAY):
        if row.start > today:  # written under a clock that ran ahead: no day of ours yet
            continue
        days = series.setdefault(row.principal, [0] * CHART_DAYS)
        days[(row.start - first_chart_day) // DAY] += row.totals.tokens
    current = history.current(now)
    no_days = [0] * CHART_DAYS
    return {
        principal: _recent(current.get(principal, Current()), series.get(principal, no_days))
        for principal in current.keys() | series.keys()
    }


def _recent(used: Current, days: list[int]) -> RecentUsage:
    return RecentUsage(
        requests_today=used.today.requests,
        tokens_today=used.today.tokens,
        requests_month=used.month.requests,
        tokens_month=used.month.tokens,
        tokens_per_day=tuple(days),
    )


def budgets(db: Database) -> dict[str, Budget]:
    """Each principal's stored budget; a principal without a row has none."""
    return BudgetStore(db).all()
