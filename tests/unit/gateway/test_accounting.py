"""The recorder's unflushed tokens, which budgets add to the database's: never missed while a
flush is writing them in its thread, and kept when the write fails."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.upstream.usage import Usage
from tray_app.storage.database import HOUR, Database
from tray_app.storage.usage_history import UsageHistory

START = 1_800_000_000.0  # on an hour


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "lmgate.db")
    yield database
    database.close()


def stored(db: Database, principal: str) -> int:
    return UsageHistory(db).totals_since(principal, 0).tokens


class TestPendingTokens:
    def test_by_principal_and_hour(self, db: Database) -> None:
        clock = FakeClock(START)
        recorder = UsageRecorder(db, clock)
        recorder.record("key:a", Usage(10, 5))
        recorder.record("key:b", Usage(100, 0))
        clock.advance(HOUR)
        recorder.record("key:a", Usage(1, 2))
        recorder.record("key:a", None)
        recorder.record("owner", Usage(7, 0))  # a static key's label
        recorder.record("token:t", Usage(9, 0))
        assert recorder.pending_tokens("key:a", START) == 18
        assert recorder.pending_tokens("owner", START) == 7
        assert recorder.pending_tokens("key:a", START + 1) == 3
        assert recorder.pending_tokens("key:b", START) == 100
        assert recorder.pending_tokens("key:c", 0) == 0

    def test_a_flush_moves_them_to_the_database(self, db: Database) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        recorder.record("key:a", Usage(10, 5))
        assert recorder.flush()
        assert recorder.pending_tokens("key:a", 0) == 0
        assert stored(db, "key:a") == 15

    def test_a_batch_being_written_still_counts(self, db: Database) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        recorder.record("key:a", Usage(10, 5))
        flushed = threading.Event()
        # Holding the database (its lock is per connection, re-entrant per thread) keeps the
        # flush thread waiting inside its write, after it took the batch out of pending.
        with db.transaction():
            flusher = threading.Thread(target=lambda: flushed.set() if recorder.flush() else None)
            flusher.start()
            while recorder.has_pending:  # until the flush took the batch to write it
                threading.Event().wait(0.001)
            assert recorder.pending_tokens("key:a", 0) == 15
            assert stored(db, "key:a") == 0
        flusher.join(5)
        assert flushed.is_set()
        assert recorder.pending_tokens("key:a", 0) == 0
        assert stored(db, "key:a") == 15

    def test_a_failed_write_keeps_them(self, db: Database) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        recorder.record("key:a", Usage(10, 5))
        recorder.record("device:d", Usage(1, 1))
        with db.transaction() as conn:
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON usage_days "
                "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
            )
        assert recorder.flush() is False
        assert recorder.pending_tokens("key:a", 0) == 15
        recorder.record("key:a", Usage(1, 0))
        assert recorder.pending_tokens("key:a", 0) == 16
        with db.transaction() as conn:
            conn.execute("DROP TRIGGER refuse")
        assert recorder.flush() is True
        assert recorder.pending_tokens("key:a", 0) == 0
        assert (stored(db, "key:a"), stored(db, "device:d")) == (16, 2)

    def test_nothing_to_flush(self, db: Database) -> None:
        assert UsageRecorder(db, FakeClock(START)).flush() is True


class TestAWriteThatFailsInAnyWay:
    """A flush that fails, whatever raised, keeps every principal's usage for the next try,
    says so in the log once per outage, and returns instead of raising, so the periodic
    flush goes on."""

    def test_a_value_sqlite_refuses_loses_nothing(self, db: Database) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        recorder.record("key:a", Usage(5, 2**64))  # beyond SQLite's INTEGER: OverflowError
        recorder.record("key:b", Usage(5, 7))
        assert recorder.flush() is False
        assert recorder.has_pending
        assert recorder.pending_tokens("key:a", 0) == 5 + 2**64
        assert recorder.pending_tokens("key:b", 0) == 12
        assert stored(db, "key:b") == 0  # one transaction: nothing half written

    def test_it_is_logged_once_by_its_type_only(
        self, db: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        recorder.record("key:secret-looking", Usage(5, 2**64))
        with caplog.at_level(logging.INFO, "lmgate.accounting"):
            assert recorder.flush() is False
            recorder.record("key:b", Usage(1, 1))
            assert recorder.flush() is False
        assert [r.getMessage() for r in caplog.records] == [
            "usage could not be saved, will retry: OverflowError"
        ]

    def test_a_storage_error_says_what_failed_and_the_recovery_is_logged(
        self, db: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        recorder.record("key:a", Usage(10, 5))
        refuse_writes(db)
        with caplog.at_level(logging.INFO, "lmgate.accounting"):
            assert recorder.flush() is False
            assert recorder.flush() is False
            allow_writes(db)
            assert recorder.flush() is True
            recorder.record("key:a", Usage(1, 0))
            assert recorder.flush() is True
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2
        assert messages[0].startswith("usage could not be saved, will retry: ")
        assert "simulated write failure" in messages[0]
        assert messages[1] == "usage is saved again"
        assert stored(db, "key:a") == 16

    def test_a_later_outage_is_logged_again(
        self, db: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        recorder = UsageRecorder(db, FakeClock(START))
        with caplog.at_level(logging.ERROR, "lmgate.accounting"):
            for _ in range(2):
                recorder.record("key:a", Usage(1, 1))
                refuse_writes(db)
                assert recorder.flush() is False
                allow_writes(db)
                assert recorder.flush() is True
        assert len(caplog.records) == 2
        assert stored(db, "key:a") == 4


def refuse_writes(db: Database) -> None:
    with db.transaction() as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON usage_days "
            "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
        )


def allow_writes(db: Database) -> None:
    with db.transaction() as conn:
        conn.execute("DROP TRIGGER refuse")
