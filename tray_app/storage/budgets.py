"""STAND-IN, until the identity helper's BudgetStore lands (the lead keeps theirs at merge):
only the read the tray needs, ``BudgetStore(db).all()``, over the schema v4 budgets table."""

from __future__ import annotations

from dataclasses import dataclass

from tray_app.storage.database import Database


@dataclass(frozen=True, slots=True)
class StoredBudget:
    # Storage cannot import identity's Budget (the layers contract), so it has its own shape.
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None


class BudgetStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> dict[str, StoredBudget]:
        rows = self._db.query("SELECT principal, tokens_per_day, tokens_per_month FROM budgets")
        return {
            r["principal"]: StoredBudget(r["tokens_per_day"], r["tokens_per_month"]) for r in rows
        }
