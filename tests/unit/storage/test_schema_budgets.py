"""Schema step 4: a version-3 database opens as version 4 with every credential, conversation
and usage total it had, and gains empty budgets, usage buckets and audit trail; opening it
again changes nothing more."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.fakes import FakeClock
from tray_app.storage.audit import AuditLog, AuditSource
from tray_app.storage.budgets import Budget, BudgetStore
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.credentials import CredentialStore
from tray_app.storage.database import SCHEMA_VERSION, Database, UsageRow
from tray_app.storage.usage_history import UsageHistory

# Every table exactly as version 3 created it, with a little of everything in it.
_V3 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '3');
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL, models TEXT, created REAL NOT NULL, expires REAL,
    last_used REAL, revoked REAL);
CREATE TABLE tokens (
    jti TEXT PRIMARY KEY, sub TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    scopes TEXT NOT NULL, models TEXT, max_tokens INTEGER, created REAL NOT NULL,
    expires REAL NOT NULL, revoked REAL, device_id TEXT, issued_sub TEXT);
CREATE TABLE devices (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, last_seen REAL,
    revoked REAL);
CREATE TABLE pairing_codes (
    code_hash TEXT PRIMARY KEY, created REAL NOT NULL, expires REAL NOT NULL, used REAL,
    device_id TEXT, device_name TEXT);
CREATE TABLE conversations (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, title TEXT NOT NULL, model TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, system TEXT);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, reasoning TEXT, created REAL NOT NULL,
    image TEXT);
CREATE TABLE usage (
    principal TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    last_seen REAL);
INSERT INTO api_keys VALUES ('k1', 'script', 'h1', 'chat models', NULL, 1, NULL, 5, NULL);
INSERT INTO devices VALUES ('d1', 'phone', 1, 6, NULL);
INSERT INTO tokens VALUES ('j1', 'device:d1', 'phone', 'device', 'chat models', NULL, NULL, 1,
    9999999999, NULL, 'd1', NULL);
INSERT INTO conversations VALUES ('c1', 'device:d1', 'Hello', 'm', 1, 1, '');
INSERT INTO messages (conversation_id, role, content, created) VALUES ('c1', 'user', 'hi', 1);
INSERT INTO usage VALUES ('key:k1', 12, 300, 400, 5);
INSERT INTO usage VALUES ('device:d1', 3, 30, 40, 6);
"""


def v3_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(_V3)
    conn.close()


class TestSchemaStep4:
    def test_a_version_3_database_opens_as_version_4_with_all_it_had(self, tmp_path: Path) -> None:
        path = tmp_path / "lmgate.db"
        v3_database(path)
        for _ in range(2):  # opening it again changes nothing more
            db = Database(path)
            assert db.meta("schema_version") == str(SCHEMA_VERSION) == "4"
            store = CredentialStore(db)
            assert [k.id for k in store.api_keys()] == ["k1"]
            assert [d.id for d in store.devices()] == ["d1"]
            found = store.token("j1")
            assert found is not None and found[1]
            [message] = ConversationStore(db, FakeClock()).messages("c1")
            assert message.content == "hi"
            assert [
                (u.principal, u.requests, u.prompt_tokens, u.completion_tokens) for u in db.usage()
            ] == [
                ("device:d1", 3, 30, 40),
                ("key:k1", 12, 300, 400),
            ]
            assert BudgetStore(db).all() == {}
            assert AuditLog(db).entries() == []
            db.close()

    def test_the_upgraded_database_keeps_budgets_buckets_and_the_trail(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "lmgate.db"
        v3_database(path)
        db = Database(path)
        BudgetStore(db).set("key:k1", Budget(1000), now=10.0, source=AuditSource.CLI)
        db.add_usage([UsageRow("key:k1", 1, 2, 3, 7200.0, hour=7200)])
        db.close()
        db = Database(path)
        try:
            assert BudgetStore(db).get("key:k1") == Budget(1000)
            assert UsageHistory(db).totals_since("key:k1", 0).tokens == 5
            # The old totals and the new usage add up; the old had no buckets to put it in.
            assert [u.requests for u in db.usage() if u.principal == "key:k1"] == [13]
            assert len(AuditLog(db).entries()) == 1
        finally:
            db.close()
