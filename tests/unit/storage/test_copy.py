"""Copying one machine's database into a team gateway's (tray_app.storage.copy), in process:
the copy is the same row for row, a destination holding anything is refused untouched, and a
copy that does not come out equal is rolled back whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tray_app.clock import SystemClock
from tray_app.errors import StorageError
from tray_app.identity.api_keys import ApiKeyService
from tray_app.storage import copy
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.copy import COLUMNS, TABLES, copy_database
from tray_app.storage.database import Database
from tray_app.storage.postgres import PostgresDatabase

CHAT = frozenset({"chat"})


def counts(db: Database) -> dict[str, int]:
    return {t: int(db.query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in TABLES}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Database]:
    db = Database(tmp_path / "lmgate.db")
    keys = ApiKeyService(db, FakeClock())
    for n in range(5):
        keys.create(f"script-{n}", scopes=CHAT)
    chats = ConversationStore(db, SystemClock())
    for n in range(7):
        chat = chats.create("key:owner", f"question {n}", "m")
        chats.append(chat.id, "user", f"question {n} with a % and a ? in it")
    yield db
    db.close()


@pytest.fixture
def pg(postgres_url: str) -> Iterator[PostgresDatabase]:
    db = PostgresDatabase.connect(postgres_url, pool_size=2)
    yield db
    db.close()


def test_the_copy_is_the_same_row_for_row_in_small_batches(
    source: Database, pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copy, "BATCH_ROWS", 2)  # every table over several batches
    report = copy_database(source, pg)
    assert report.copied == counts(source) == counts(pg)
    assert report.copied["api_keys"] == 5 and report.copied["messages"] == 7
    assert report.sampled >= 5 + 7 + 7
    for table in TABLES:
        sql = f"SELECT {', '.join(COLUMNS[table])} FROM {table} ORDER BY {COLUMNS[table][0]}, 2"
        assert [tuple(r) for r in pg.query(sql)] == [tuple(r) for r in source.query(sql)]


def test_ids_made_after_the_copy_come_after_the_copied_ones(
    source: Database, pg: PostgresDatabase
) -> None:
    copy_database(source, pg)
    highest = int(pg.query("SELECT MAX(id) FROM messages")[0][0])
    chats = ConversationStore(pg, SystemClock())
    chat = chats.create("key:owner", "after", "m")
    assert chats.append(chat.id, "user", "after")
    assert int(pg.query("SELECT MAX(id) FROM messages")[0][0]) == highest + 1


def test_a_destination_holding_anything_is_refused_untouched(
    source: Database, pg: PostgresDatabase
) -> None:
    ApiKeyService(pg, FakeClock()).create("already-here", scopes=CHAT)
    before = counts(pg)
    with pytest.raises(StorageError, match="already holds 1 rows in api_keys"):
        copy_database(source, pg)
    assert counts(pg) == before


def test_a_copy_that_does_not_come_out_equal_is_rolled_back_whole(
    source: Database, pg: PostgresDatabase
) -> None:
    # A destination that changes what it is given (a trigger someone left there).
    for statement in (
        "CREATE FUNCTION shout() RETURNS trigger AS $$ BEGIN NEW.name := upper(NEW.name); "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER shout BEFORE INSERT ON api_keys FOR EACH ROW EXECUTE FUNCTION shout()",
    ):
        with pg.transaction() as conn:
            conn.execute(statement)
    with pytest.raises(StorageError, match="does not match; rolled back"):
        copy_database(source, pg)
    assert counts(pg) == dict.fromkeys(TABLES, 0)
