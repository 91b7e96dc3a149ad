"""Usage over time: requests and tokens per principal in UTC hour and day buckets.

The gateway's usage flush writes the buckets (:meth:`Database.add_usage`, in the same
transaction as the totals); this module only reads them, for budgets after a restart, the
tray's charts and ``lmgate usage --since``. Hours are kept for 40 days, days for good.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from tray_app.storage.database import DAY, HOUR, KEEP_HOURS_SECONDS, Database


class Bucket(StrEnum):
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return HOUR if self is Bucket.HOUR else DAY

    @property
    def _table(self) -> tuple[str, str]:
        return ("usage_hours", "hour") if self is Bucket.HOUR else ("usage_days", "day")


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class BucketRow:
    principal: str
    start: int  # epoch seconds, UTC, the bucket's first second
    totals: Totals


@dataclass(frozen=True, slots=True)
class Current:
    """What a principal used in the UTC day and month a budget is counting now."""

    today: Totals = Totals()
    month: Totals = Totals()


def finest_bucket(since: float, now: float) -> Bucket:
    """The bucket that still holds every hour from ``since`` on: hours while they are kept,
    days before that."""
    return Bucket.HOUR if since >= now - KEEP_HOURS_SECONDS + HOUR else Bucket.DAY


def bucket_start(when: float, bucket: Bucket) -> int:
    return int(when) // bucket.seconds * bucket.seconds


def day_start(when: float) -> int:
    return int(when) // DAY * DAY


def month_start(when: float) -> int:
    """The first second of ``when``'s UTC calendar month."""
    moment = dt.datetime.fromtimestamp(when, dt.UTC)
    return int(dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC).timestamp())


def next_month_start(when: float) -> int:
    moment = dt.datetime.fromtimestamp(when, dt.UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return int(dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp())


class UsageHistory:
    def __init__(self, db: Database) -> None:
        self._db = db

    def totals_since(self, principal: str, since: float, bucket: Bucket = Bucket.DAY) -> Totals:
        """What ``principal`` used in buckets starting at or after ``since``."""
        table, column = bucket._table
        rows = self._db.query(
            "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) AS r, "  # noqa: S608
            "CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS p, "
            f"CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS c FROM {table} "
            f"WHERE principal = ? AND {column} >= ?",
            (principal, int(since)),
        )
        return Totals(rows[0]["r"], rows[0]["p"], rows[0]["c"])

    def series(self, since: float, bucket: Bucket, principal: str | None = None) -> list[BucketRow]:
        """Every non-empty bucket from ``since`` on, oldest first (then by principal)."""
        table, column = bucket._table
        where = f"{column} >= ?"
        params: tuple[object, ...] = (int(since) // bucket.seconds * bucket.seconds,)
        if principal is not None:
            where += " AND principal = ?"
            params = (*params, principal)
        rows = self._db.query(
            f"SELECT principal, {column} AS start, requests, prompt_tokens, completion_tokens "  # noqa: S608
            f"FROM {table} WHERE {where} ORDER BY {column}, principal",
            params,
        )
        return [
            BucketRow(
                r["principal"],
                r["start"],
                Totals(r["requests"], r["prompt_tokens"], r["completion_tokens"]),
            )
            for r in rows
        ]

    def per_principal(self, since: float, bucket: Bucket = Bucket.DAY) -> dict[str, Totals]:
        """Totals per principal over the buckets from the one ``since`` falls in on."""
        table, column = bucket._table
        rows = self._db.query(
            "SELECT principal, CAST(SUM(requests) AS BIGINT) AS r, "  # noqa: S608
            "CAST(SUM(prompt_tokens) AS BIGINT) AS p, "
            f"CAST(SUM(completion_tokens) AS BIGINT) AS c FROM {table} WHERE {column} >= ? "
            "GROUP BY principal ORDER BY principal",
            (bucket_start(since, bucket),),
        )
        return {r["principal"]: Totals(r["r"], r["p"], r["c"]) for r in rows}

    def current(self, now: float) -> dict[str, Current]:
        """Each principal's use today and this month, in one read. A day after today (written
        while the clock ran ahead) is no day of this month's yet."""
        today = day_start(now)
        rows = self._db.query(
            "SELECT principal, "
            "CAST(SUM(CASE WHEN day = ? THEN requests ELSE 0 END) AS BIGINT) AS dr, "
            "CAST(SUM(CASE WHEN day = ? THEN prompt_tokens ELSE 0 END) AS BIGINT) AS dp, "
            "CAST(SUM(CASE WHEN day = ? THEN completion_tokens ELSE 0 END) AS BIGINT) AS dc, "
            "CAST(SUM(requests) AS BIGINT) AS mr, CAST(SUM(prompt_tokens) AS BIGINT) AS mp, "
            "CAST(SUM(completion_tokens) AS BIGINT) AS mc "
            "FROM usage_days WHERE day >= ? AND day <= ? GROUP BY principal ORDER BY principal",
            (today, today, today, month_start(now), today),
        )
        return {
            r["principal"]: Current(
                Totals(r["dr"], r["dp"], r["dc"]), Totals(r["mr"], r["mp"], r["mc"])
            )
            for r in rows
        }
