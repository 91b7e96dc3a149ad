"""The budgets table: what is stored is what is read back, no budget is no row, and every
change is recorded in the audit trail in the same transaction (or neither happens)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tray_app.errors import StorageError
from tray_app.storage.audit import AuditAction, AuditEntry, AuditLog, AuditSource
from tray_app.storage.budgets import NO_BUDGET, Budget, BudgetStore, write_budget
from tray_app.storage.database import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "lmgate.db")
    yield database
    database.close()


def rows(db: Database) -> list[tuple[str, int | None, int | None, float]]:
    return [
        (r["principal"], r["tokens_per_day"], r["tokens_per_month"], r["updated"])
        for r in db.query("SELECT * FROM budgets ORDER BY principal")
    ]


def fail_audit_writes(db: Database) -> None:
    with db.transaction() as conn:
        conn.execute(
            "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'no'); END"
        )


class TestBudget:
    def test_no_cap_either_way_is_unlimited(self) -> None:
        assert not Budget().limited and Budget(None, None) == NO_BUDGET
        assert Budget(tokens_per_day=1).limited and Budget(tokens_per_month=1).limited

    @pytest.mark.parametrize(
        ("budget", "words"),
        [
            (Budget(), "no budget"),
            (Budget(50_000), "50,000/day, no monthly cap"),
            (Budget(None, 1_000_000), "no daily cap, 1,000,000/month"),
            (Budget(1, 2), "1/day, 2/month"),
        ],
    )
    def test_words(self, budget: Budget, words: str) -> None:
        assert budget.words() == words


class TestBudgetStore:
    def test_an_empty_table_has_no_budgets(self, db: Database) -> None:
        store = BudgetStore(db)
        assert store.all() == {}
        assert store.get("key:k1") is None

    def test_a_set_budget_is_read_back_by_principal(self, db: Database) -> None:
        store = BudgetStore(db)
        assert store.set("key:k1", Budget(100, None), now=10.0, source=AuditSource.CLI) == NO_BUDGET
        store.set("device:d1", Budget(None, 5000), now=11.0, source=AuditSource.TRAY)
        assert store.all() == {"key:k1": Budget(100, None), "device:d1": Budget(None, 5000)}
        assert store.get("device:d1") == Budget(None, 5000)
        assert rows(db) == [("device:d1", None, 5000, 11.0), ("key:k1", 100, None, 10.0)]

    def test_a_change_replaces_the_budget_and_returns_the_one_before(self, db: Database) -> None:
        store = BudgetStore(db)
        store.set("key:k1", Budget(100, 1000), now=10.0, source=AuditSource.CLI)
        before = store.set("key:k1", Budget(200, None), now=20.0, source=AuditSource.CLI)
        assert before == Budget(100, 1000)
        assert rows(db) == [("key:k1", 200, None, 20.0)]

    def test_clearing_leaves_no_row(self, db: Database) -> None:
        store = BudgetStore(db)
        store.set("key:k1", Budget(100), now=10.0, source=AuditSource.CLI)
        assert store.set("key:k1", NO_BUDGET, now=20.0, source=AuditSource.CLI) == Budget(100)
        assert rows(db) == [] and store.get("key:k1") is None

    def test_every_change_is_one_audit_entry_saying_what_it_was(self, db: Database) -> None:
        store = BudgetStore(db)
        store.set("key:k1", Budget(100), now=10.0, source=AuditSource.CLI, name="alice")
        store.set("key:k1", Budget(None, 900), now=20.0, source=AuditSource.TRAY)
        assert AuditLog(db).entries() == [
            AuditEntry(
                10.0,
                AuditAction.BUDGET_CHANGED,
                "key:k1",
                "alice",
                AuditSource.CLI,
                "100/day, no monthly cap (was no budget)",
            ),
            AuditEntry(
                20.0,
                AuditAction.BUDGET_CHANGED,
                "key:k1",
                None,
                AuditSource.TRAY,
                "no daily cap, 900/month (was 100/day, no monthly cap)",
            ),
        ]

    def test_setting_the_same_budget_again_changes_and_records_nothing(self, db: Database) -> None:
        store = BudgetStore(db)
        store.set("key:k1", Budget(100), now=10.0, source=AuditSource.CLI)
        store.set("key:k1", Budget(100), now=20.0, source=AuditSource.CLI)
        store.set("key:k2", NO_BUDGET, now=20.0, source=AuditSource.CLI)
        assert rows(db) == [("key:k1", 100, None, 10.0)]
        assert len(AuditLog(db).entries()) == 1

    def test_a_change_whose_audit_entry_cannot_be_written_is_not_made(self, db: Database) -> None:
        store = BudgetStore(db)
        store.set("key:k1", Budget(100), now=10.0, source=AuditSource.CLI)
        fail_audit_writes(db)
        with pytest.raises(StorageError):
            store.set("key:k1", Budget(5), now=20.0, source=AuditSource.CLI)
        assert store.get("key:k1") == Budget(100)


class TestWriteBudget:
    def test_writes_and_clears_inside_the_callers_transaction(self, db: Database) -> None:
        with db.transaction() as conn:
            write_budget(conn, "token:t1", Budget(7, 70), 5.0)
        assert rows(db) == [("token:t1", 7, 70, 5.0)]
        with db.transaction() as conn:
            write_budget(conn, "token:t1", Budget(8), 6.0)
        assert rows(db) == [("token:t1", 8, None, 6.0)]
        with db.transaction() as conn:
            write_budget(conn, "token:t1", NO_BUDGET, 7.0)
        assert rows(db) == []
