"""Schema step 3: conversations keep a system prompt, messages a photo; the step is idempotent
and an older database keeps its history."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.fakes import FakeClock
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.database import SCHEMA_VERSION, Database

# The two tables exactly as version 2 created them.
_V2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '2');
CREATE TABLE conversations (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, title TEXT NOT NULL, model TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, reasoning TEXT, created REAL NOT NULL);
INSERT INTO conversations VALUES ('old', 'device:d1', 'Before', 'm', 1, 1);
INSERT INTO messages (conversation_id, role, content, created) VALUES ('old', 'user', 'hi', 1);
"""


def columns(path: Path, table: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


class TestSchemaStep3:
    def test_a_version_2_database_gains_the_columns_and_keeps_its_history(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "lmgate.db"
        conn = sqlite3.connect(path)
        conn.executescript(_V2)
        conn.close()
        for _ in range(2):  # opening it again changes nothing more
            db = Database(path)
            assert db.meta("schema_version") == str(SCHEMA_VERSION) == "4"
            store = ConversationStore(db, FakeClock())
            old = store.get("device:d1", "old")
            assert old is not None and old.system == ""
            [message] = store.messages("old")
            assert (message.content, message.image) == ("hi", None)
            db.close()
        assert "system" in columns(path, "conversations")
        assert "image" in columns(path, "messages")

    def test_a_step_interrupted_after_one_column_finishes_on_the_next_start(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "lmgate.db"
        conn = sqlite3.connect(path)
        conn.executescript(_V2 + "ALTER TABLE conversations ADD COLUMN system TEXT;")
        conn.close()
        Database(path).close()
        assert "image" in columns(path, "messages")

    def test_a_new_database_stores_and_reads_both(self, tmp_path: Path) -> None:
        db = Database(tmp_path / "lmgate.db")
        store = ConversationStore(db, FakeClock())
        chat = store.create("p", "Look", "m", system="Be brief.")
        store.append(chat.id, "user", "Look", image="data:image/png;base64,AAAA")
        again = store.get("p", chat.id)
        assert again is not None and again.system == "Be brief."
        assert store.messages(chat.id)[0].image == "data:image/png;base64,AAAA"
        store.set_system(chat.id, "")
        again = store.get("p", chat.id)
        assert again is not None and again.system == ""
        db.close()
