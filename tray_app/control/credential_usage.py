"""What each credential used lately, for the Devices window: today, this month and a short
series of tokens per day, with its budget. Read for all principals at once (one query over
the day buckets, one over the budgets), however many credentials there are.

Days and months are UTC, as budgets count them, so "today" here is the day a budget resets on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tray_app.identity.principal import Budget
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.database import DAY, Database
from tray_app.storage.usage_history import Bucket, UsageHistory, day_start, month_start

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
    today = day_start(now)
    first_chart_day = today - (CHART_DAYS - 1) * DAY
    this_month = month_start(now)
    rows = UsageHistory(db).series(min(first_chart_day, this_month), Bucket.DAY)
    counts: dict[str, list[int]] = {}
    series: dict[str, list[int]] = {}
    for row in rows:
        if row.start > today:  # written under a clock that ran ahead: no day of ours yet
            continue
        count = counts.setdefault(row.principal, [0, 0, 0, 0])
        if row.start == today:
            count[0] += row.totals.requests
            count[1] += row.totals.tokens
        if row.start >= this_month:
            count[2] += row.totals.requests
            count[3] += row.totals.tokens
        if row.start >= first_chart_day:
            days = series.setdefault(row.principal, [0] * CHART_DAYS)
            days[(row.start - first_chart_day) // DAY] += row.totals.tokens
    return {
        principal: RecentUsage(
            requests_today=count[0],
            tokens_today=count[1],
            requests_month=count[2],
            tokens_month=count[3],
            tokens_per_day=tuple(series.get(principal, [0] * CHART_DAYS)),
        )
        for principal, count in counts.items()
    }


def budgets(db: Database) -> dict[str, Budget]:
    """Each principal's stored budget; a principal without a row has none."""
    return BudgetStore(db).all()
