"""Token budgets per principal: the ``budgets`` table.

A budget is stored by principal name (``key:<id>``, ``device:<id>``, ``token:<jti>``, ...), so a
device's tokens all share the device's budget. A credential's first budget is written in the
transaction that creates the credential (``write_budget``); later changes go through
:class:`BudgetStore`, each with its audit entry in the same transaction. :class:`Budget` lives
here, below the identity layer, so that storage can hand it out; the identity layer re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tray_app.storage.audit import AuditAction, AuditSource, record
from tray_app.storage.database import Connection, Database


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens (prompt + completion) a principal may use per UTC day and month; None: no cap."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def limited(self) -> bool:
        return self.tokens_per_day is not None or self.tokens_per_month is not None

    def words(self) -> str:
        """How the audit trail and the CLI say it: ``50,000/day, no monthly cap``."""
        if not self.limited:
            return "no budget"
        day = "no daily cap" if self.tokens_per_day is None else f"{self.tokens_per_day:,}/day"
        month = (
            "no monthly cap"
            if self.tokens_per_month is None
            else f"{self.tokens_per_month:,}/month"
        )
        return f"{day}, {month}"


NO_BUDGET = Budget()


def write_budget(conn: Connection, principal: str, budget: Budget, now: float) -> None:
    """Set ``principal``'s budget inside the caller's transaction; an unlimited one is no row."""
    if not budget.limited:
        conn.execute("DELETE FROM budgets WHERE principal = ?", (principal,))
        return
    conn.execute(
        "INSERT INTO budgets (principal, tokens_per_day, tokens_per_month, updated) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (principal) DO UPDATE SET "
        "tokens_per_day = excluded.tokens_per_day, "
        "tokens_per_month = excluded.tokens_per_month, updated = excluded.updated",
        (principal, budget.tokens_per_day, budget.tokens_per_month, now),
    )


def _read(conn: Connection, principal: str) -> Budget:
    row = conn.execute(
        "SELECT tokens_per_day, tokens_per_month FROM budgets WHERE principal = ?", (principal,)
    ).fetchone()
    return NO_BUDGET if row is None else Budget(row[0], row[1])


class BudgetStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> dict[str, Budget]:
        """Every stored budget by principal name (a principal without a row has none)."""
        rows = self._db.query(
            "SELECT principal, tokens_per_day, tokens_per_month FROM budgets ORDER BY rowid"
        )
        return {r["principal"]: Budget(r["tokens_per_day"], r["tokens_per_month"]) for r in rows}

    def get(self, principal: str) -> Budget | None:
        rows = self._db.query(
            "SELECT tokens_per_day, tokens_per_month FROM budgets WHERE principal = ?",
            (principal,),
        )
        return Budget(rows[0]["tokens_per_day"], rows[0]["tokens_per_month"]) if rows else None

    def set(
        self,
        principal: str,
        budget: Budget,
        *,
        now: float,
        source: AuditSource,
        name: str | None = None,
    ) -> Budget:
        """Replace ``principal``'s budget (``NO_BUDGET`` clears it) and record the change with
        what it was before; returns the budget before. A change to the same budget is none:
        nothing is written."""
        with self._db.transaction(notify=True) as conn:
            before = _read(conn, principal)
            if before != budget:
                write_budget(conn, principal, budget, now)
                record(
                    conn,
                    at=now,
                    action=AuditAction.BUDGET_CHANGED,
                    principal=principal,
                    source=source,
                    name=name,
                    detail=f"{budget.words()} (was {before.words()})",
                )
        return before
