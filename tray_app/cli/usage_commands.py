"""`lmgate usage` and `lmgate audit`: who used what, against which budget, and every change
made to a credential. Tables for people; ``--csv`` (a header row, times in ISO 8601 UTC) for
scripts and spreadsheets."""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO

from tray_app.cli.input_errors import InputError
from tray_app.config.settings import parse_duration
from tray_app.control.assembly import Identity
from tray_app.identity.principal import Budget, CredentialKind, PrincipalId
from tray_app.storage.audit import AuditLog
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.usage_history import (
    Bucket,
    Current,
    Totals,
    UsageHistory,
    bucket_start,
    finest_bucket,
)

USAGE_COMMANDS = frozenset({"usage", "audit"})
# More than anyone reads in a terminal; a longer trail is for --since and --csv.
_AUDIT_ROWS = 100_000


def add_usage_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    usage = commands.add_parser(
        "usage", parents=[common], help="requests and tokens per credential, against its budget"
    )
    usage.add_argument(
        "--since",
        help="only usage since, e.g. 36h, 7d (from the hour) or 2026-11-20 (UTC midnight); "
        "default: all of it",
    )
    usage.add_argument("--by", choices=[b.value for b in Bucket], help="one row per hour or day")
    usage.add_argument("--csv", action="store_true", help="comma-separated, with a header row")
    audit = commands.add_parser("audit", parents=[common], help="every change to a credential")
    audit.add_argument(
        "--since", default="30d", help="entries since, e.g. 7d or 2026-11-20 (default: 30d)"
    )
    audit.add_argument("--csv", action="store_true", help="comma-separated, with a header row")


@dataclass(frozen=True, slots=True)
class Credential:
    """One credential as a principal: what usage, budgets and the audit trail are kept under."""

    principal: str
    name: str
    kind: CredentialKind
    ident: str  # the key's or device's ID, the token's jti
    live: bool


# Tokens that are their own principal (a device's tokens speak for the device).
_OWN_PRINCIPAL = frozenset({CredentialKind.TOKEN, CredentialKind.SNIPPET})


def credentials(identity: Identity) -> list[Credential]:
    """Every credential ever made, oldest kind first: keys, devices, then tokens."""
    now = identity.clock.time()
    found = [
        Credential(
            k.principal_name,
            k.name,
            CredentialKind.KEY,
            k.id,
            k.revoked is None and (k.expires is None or k.expires > now),
        )
        for k in identity.api_keys.list()
    ]
    found += [
        Credential(d.principal_name, d.name, CredentialKind.DEVICE, d.id, d.revoked is None)
        for d in identity.pairing.devices()
    ]
    found += [
        Credential(t.sub, t.name, t.kind, t.jti, t.revoked is None and t.expires > now)
        for t in identity.tokens.list(include_expired=True)
        if t.kind in _OWN_PRINCIPAL
    ]
    return found


def run_usage_command(args: argparse.Namespace, identity: Identity, out: IO[str]) -> int:
    if args.command == "audit":
        return _audit(args, identity, out)
    return _usage(args, identity, out)


def iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


# A calendar date names its UTC midnight. [0-9], not \d: digits of other scripts are no date here.
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_SINCE_FORMS = "a time ago like 36h or 7d, or a UTC date like 2026-11-20"


@dataclass(frozen=True, slots=True)
class Since:
    """Where a ``--since`` starts, on a bucket's first second, and the finest bucket that still
    reaches back that far (hours for 40 days, days before)."""

    start: int
    bucket: Bucket

    def words(self) -> str:
        return f"since {when(self.start)}"


def parse_since(raw: str, now: float) -> Since:
    """``--since`` for every command that has one: a duration back from ``now`` (a unit is
    required: a bare ``7`` reads as seven seconds to the parser and as seven days to a person)
    or a date. The start is rounded down to the hour, or to the day once hours are no longer
    kept, so the totals are exactly the buckets from there on."""
    text = raw.strip()
    if _DATE.fullmatch(text):
        try:
            moment = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise InputError("--since", f"{raw!r} is not a calendar date") from None
    elif text[-1:].isalpha():
        try:
            moment = now - parse_duration(text)
        except ValueError:
            raise InputError("--since", f"must be {_SINCE_FORMS}, got {raw!r}") from None
    else:
        raise InputError("--since", f"must be {_SINCE_FORMS}, got {raw!r}")
    if moment > now:
        raise InputError("--since", f"{raw!r} is in the future")
    moment = max(moment, 0.0)  # a span longer than the epoch means all of it
    bucket = finest_bucket(moment, now)
    return Since(bucket_start(moment, bucket), bucket)


def table(out: IO[str], header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if not rows:
        print("(none)", file=out)
        return
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _write(
    out: IO[str], as_csv: bool, header: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    if as_csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([h.lower().replace(" ", "_") for h in header])
        writer.writerows(rows)
    else:
        table(out, header, rows)


def _label(principal: str, names: dict[str, Credential]) -> tuple[str, str]:
    """(name, kind) of ``principal``, as far as a credential still says."""
    found = names.get(principal)
    if found is not None:
        return found.name, found.kind.value
    who = PrincipalId.parse(principal)
    if who is None:
        return "", ""
    if who.kind in _OWN_PRINCIPAL:
        # Counted before each token was its own principal, when tokens sharing a name did.
        return f"{who.id} (older tokens sharing that name)", who.kind.value
    return "", who.kind.value


def against(used: int, limit: int | None) -> str:
    return f"{used:,}" if limit is None else f"{used:,} of {limit:,}"


def _usage(args: argparse.Namespace, identity: Identity, out: IO[str]) -> int:
    now = identity.clock.time()
    start = None if args.since is None else parse_since(args.since, now)
    names = {c.principal: c for c in credentials(identity)}
    history = UsageHistory(identity.db)
    if args.by is not None:
        bucket = Bucket(args.by)
        first_bucket = 0 if start is None else bucket_start(start.start, bucket)
        rows = [
            (
                iso(row.start) if args.csv else when(row.start),
                row.principal,
                *_label(row.principal, names),
                str(row.totals.requests),
                str(row.totals.prompt_tokens),
                str(row.totals.completion_tokens),
            )
            for row in history.series(first_bucket, bucket)
        ]
        if start is not None:
            _since_header(out, args.csv, Since(first_bucket, bucket))
        header = ("START", "PRINCIPAL", "NAME", "KIND", "REQUESTS", "PROMPT TOKENS")
        _write(out, args.csv, (*header, "COMPLETION TOKENS"), rows)
        return 0
    totals = _totals(identity, history, start)
    current = history.current(now)
    budgets = BudgetStore(identity.db).all()
    table_rows = []
    for principal in sorted(totals):
        used, last_seen = totals[principal]
        name, kind = _label(principal, names)
        budget = budgets.get(principal, Budget())
        day_used = current.get(principal, Current()).today.tokens
        month_used = current.get(principal, Current()).month.tokens
        if args.csv:
            budget_columns: tuple[str, ...] = (
                str(day_used),
                _number(budget.tokens_per_day),
                str(month_used),
                _number(budget.tokens_per_month),
                iso(last_seen),
            )
        else:
            budget_columns = (
                against(day_used, budget.tokens_per_day),
                against(month_used, budget.tokens_per_month),
                when(last_seen),
            )
        table_rows.append(
            (
                principal,
                name,
                str(used.requests),
                str(used.prompt_tokens),
                str(used.completion_tokens),
                *budget_columns,
                kind,
            )
        )
    first = ("PRINCIPAL", "NAME", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS")
    if args.csv:
        rest: tuple[str, ...] = (
            "TOKENS TODAY",
            "BUDGET DAY",
            "TOKENS THIS MONTH",
            "BUDGET MONTH",
            "LAST SEEN",
        )
    else:
        rest = ("TODAY", "THIS MONTH", "LAST SEEN")
    if start is not None:
        _since_header(out, args.csv, start)
    _write(out, args.csv, (*first, *rest, "KIND"), table_rows)
    return 0


def _totals(
    identity: Identity, history: UsageHistory, start: Since | None
) -> dict[str, tuple[Totals, float | None]]:
    """Each principal's totals (all time, or from ``start``'s bucket on) and when it was
    last seen: the buckets keep no times, the running totals do."""
    everything = identity.db.usage()
    last_seen = {u.principal: u.last_seen for u in everything}
    if start is None:
        return {
            u.principal: (Totals(u.requests, u.prompt_tokens, u.completion_tokens), u.last_seen)
            for u in everything
        }
    return {
        p: (t, last_seen.get(p))
        for p, t in history.per_principal(start.start, start.bucket).items()
    }


def _since_header(out: IO[str], as_csv: bool, start: Since) -> None:
    # A CSV keeps its columns: the start is in every row's own times or was asked for.
    if not as_csv:
        print(start.words(), file=out)


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


def _audit(args: argparse.Namespace, identity: Identity, out: IO[str]) -> int:
    start = parse_since(args.since, identity.clock.time())
    rows = [
        (
            iso(e.at) if args.csv else when(e.at),
            e.action.value,
            e.principal,
            e.name or "",
            e.source.value,
            e.detail or "",
        )
        for e in AuditLog(identity.db).entries(since=start.start, limit=_AUDIT_ROWS)
    ]
    _since_header(out, args.csv, start)
    _write(out, args.csv, ("WHEN", "ACTION", "WHO", "NAME", "FROM", "DETAIL"), rows)
    return 0
