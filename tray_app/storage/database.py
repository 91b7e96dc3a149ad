"""LM Gate's database: API key hashes, issued tokens, devices, pairing codes, usage.

SQLite in WAL mode in the platform's user data dir. No secret is ever stored: API keys and
pairing codes only as SHA-256 hashes, JWTs only by their ``jti``. The CLI and the running
gateway share the file; ``changed_since`` (SQLite's ``data_version``) lets the gateway notice the
CLI's revocations without polling tables.

Everything here is private to the user: the data directory is 0700 and the database with its
``-wal``/``-shm``/``-journal`` files 0600, enforced at every start (the WAL holds recent
conversations in clear).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tray_app.errors import StorageError
from tray_app.paths import make_private_dir, user_data_dir

# 2: every issued token and snippet is its own principal (sub = kind:jti), not kind:name.
# 3: a conversation keeps its system prompt, a message the photo sent with it.
# 4: token budgets, usage in hour and day buckets, the audit trail of credential changes.
SCHEMA_VERSION = 4
# Bumped by `lmgate keys rotate`; a running gateway that sees it change re-reads the key.
SIGNING_KEY_GENERATION = "signing_key_generation"
SIDE_FILES = ("-wal", "-shm", "-journal")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL, models TEXT, created REAL NOT NULL, expires REAL,
    last_used REAL, revoked REAL);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, sub TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    scopes TEXT NOT NULL, models TEXT, max_tokens INTEGER, created REAL NOT NULL,
    expires REAL NOT NULL, revoked REAL, device_id TEXT, issued_sub TEXT);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, last_seen REAL,
    revoked REAL);
CREATE TABLE IF NOT EXISTS pairing_codes (
    code_hash TEXT PRIMARY KEY, created REAL NOT NULL, expires REAL NOT NULL, used REAL,
    device_id TEXT, device_name TEXT);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, title TEXT NOT NULL, model TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, system TEXT);
CREATE INDEX IF NOT EXISTS conversations_by_principal ON conversations (principal, updated);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, reasoning TEXT, created REAL NOT NULL,
    image TEXT);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
CREATE TABLE IF NOT EXISTS usage (
    principal TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    last_seen REAL);
CREATE TABLE IF NOT EXISTS budgets (
    principal TEXT PRIMARY KEY, tokens_per_day INTEGER, tokens_per_month INTEGER,
    updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage_hours (
    principal TEXT NOT NULL, hour INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (principal, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_hours_by_hour ON usage_hours (hour);
CREATE TABLE IF NOT EXISTS usage_days (
    principal TEXT NOT NULL, day INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (principal, day)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_days_by_day ON usage_days (day);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL,
    principal TEXT NOT NULL, name TEXT, source TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
"""


class Row(Protocol):
    """A row read by name (``r["col"]``) or by position (``r[0]``), as every store reads them
    on any backend (sqlite3.Row here)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What a store writes through inside :meth:`Database.transaction`: ``?`` placeholders,
    rows as :class:`Row`. The SQL the stores write is the subset SQLite and PostgreSQL share
    (table-qualified columns in ON CONFLICT DO UPDATE, CASE instead of two-argument MAX,
    ON CONFLICT DO NOTHING instead of OR IGNORE, an alias on every subquery in FROM, SUMs
    cast to BIGINT, explicit ORDER BY with ``rowid`` breaking ties)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


def default_data_dir() -> Path:
    return user_data_dir()


def _make_private_database(path: Path) -> None:
    # Made 0600 before SQLite opens it: SQLite gives the -wal and -shm files it creates the
    # database file's permissions, so they are private from their first byte.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    _tighten_database_files(path)


def _tighten_database_files(path: Path) -> None:
    # Files an older version (or another umask) left readable by others.
    for name in (path.name, *(path.name + suffix for suffix in SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            (path.parent / name).chmod(0o600)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older database up to SCHEMA_VERSION (each step idempotent, all in one
    transaction, so two processes opening it at once cannot half-migrate it)."""
    if _schema_version(conn) >= SCHEMA_VERSION:
        return  # the usual case: no write lock taken
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(conn)  # again: another process may have just migrated it
        if version < 2:
            _split_shared_principals(conn)
        if version < 3:
            _add_system_prompts_and_photos(conn)
        # 4 only adds tables, which _SCHEMA creates (IF NOT EXISTS) before this runs.
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            (str(max(version, SCHEMA_VERSION)),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0])


def _split_shared_principals(conn: sqlite3.Connection) -> None:
    """Version 1 named a CLI token's principal after its name (``token:friend``) and every
    curl snippet ``snippet:curl``, so credentials sharing a name shared conversations. Each
    token becomes ``kind:jti``. History and usage follow only where one token held the old
    name; where several did, nobody can tell whose it was, so it stays under the old name,
    which no credential can reach any more."""
    sole = (
        "SELECT sub, MIN(kind) || ':' || MIN(jti) AS new FROM tokens "
        "WHERE kind IN ('token', 'snippet') AND sub != kind || ':' || jti "
        "GROUP BY sub HAVING COUNT(*) = 1"
    )
    for table in ("conversations", "usage"):
        conn.execute(
            f"UPDATE {table} SET principal = (SELECT new FROM ({sole}) WHERE sub = principal) "  # noqa: S608
            f"WHERE principal IN (SELECT sub FROM ({sole}))"
        )
    # The tokens already handed out still carry their old `sub`: it is kept, so they go on
    # matching their record and keep working after the upgrade.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tokens)")}
    if "issued_sub" not in columns:
        conn.execute("ALTER TABLE tokens ADD COLUMN issued_sub TEXT")
    conn.execute(
        "UPDATE tokens SET issued_sub = sub, sub = kind || ':' || jti "
        "WHERE kind IN ('token', 'snippet') AND sub != kind || ':' || jti"
    )


def _add_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    # Checked first: a crash between ALTER and the version update must not make the next
    # start fail on a column that is already there.
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    if column not in columns:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")


def _add_system_prompts_and_photos(conn: sqlite3.Connection) -> None:
    """Version 3: ``conversations.system`` (the per-conversation system prompt) and
    ``messages.image`` (a user turn's photo as a data URL). Both NULL for what was there."""
    _add_column(conn, "conversations", "system")
    _add_column(conn, "messages", "image")


def encode_list(values: Iterable[str] | None) -> str | None:
    return None if values is None else json.dumps(sorted(values))


def decode_list(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(json.loads(text))


@dataclass(frozen=True, slots=True)
class UsageRow:
    principal: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    last_seen: float | None
    # The UTC hour (epoch seconds, a multiple of 3600) the usage happened in; None: totals only.
    hour: int | None = None


HOUR = 3600
DAY = 86400
# Hour buckets feed the charts of the last weeks and this month's budget; days are kept for good.
KEEP_HOURS_SECONDS = 40 * DAY


class Database:
    """One SQLite connection guarded by a lock (the loop thread and a flush thread share it)."""

    # Whether a call can wait on a network (the gateway then makes it off its loop).
    remote = False

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            make_private_dir(path.parent)
            _make_private_database(path)
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
            # Rows by name and by position, in transactions as in queries.
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a crash of this process; only power loss can
            # take the last transactions.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            _migrate(self._conn)
            _tighten_database_files(path)
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"Cannot open LM Gate's database {path}: {exc}. If it is "
                "corrupt, move it aside; LM Gate creates a new one."
            ) from None
        except OSError as exc:
            raise StorageError(
                f"Cannot make {exc.filename or path.parent} private: {exc.strerror}."
            ) from None
        self._lock = threading.RLock()
        self._data_version = self._read_data_version()

    @classmethod
    def in_directory(cls, directory: Path) -> Database:
        return cls(directory / "lmgate.db")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self, *, notify: bool = False) -> Iterator[Connection]:
        """One write transaction; StorageError if it could not be committed, and then nothing
        of it was written and the connection is ready for the next try. ``notify``: a change
        other processes must notice (credentials, budgets, the signing key's generation) —
        SQLite's data_version sees every commit, so it changes nothing here; a backend shared
        by replicas counts such changes for :meth:`changed_by_others`."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._roll_back()
                    raise
            except sqlite3.DatabaseError as exc:  # full, locked, corrupt, refused by a check
                advice = " Free some disk space." if "full" in str(exc) else ""
                raise StorageError(
                    f"LM Gate's database {self.path} could not be written: {exc}.{advice}"
                ) from None

    def _roll_back(self) -> None:
        # SQLite may already have rolled back by itself (it does after some I/O errors), and
        # then a ROLLBACK would fail and hide the real error; a COMMIT that failed with
        # SQLITE_BUSY leaves the transaction open, and then every later BEGIN would fail.
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Row]:
        with self._lock:
            try:
                rows: list[Row] = self._conn.execute(sql, params).fetchall()
                return rows
            except sqlite3.DatabaseError as exc:
                raise StorageError(
                    f"LM Gate's database {self.path} could not be read: {exc}."
                ) from None

    def _read_data_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def claim_meta(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless something is stored there already; what is
        stored now (the first claim wins, whoever made it)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (key, value),
            )
        return self.meta(key) or ""

    def changed_by_others(self) -> bool:
        """True once after another connection (the CLI) committed a change."""
        version = self._read_data_version()
        if version != self._data_version:
            self._data_version = version
            return True
        return False

    # ---- usage ------------------------------------------------------------------------------

    def add_usage(
        self,
        rows: Iterable[UsageRow],
        key_last_used: Mapping[str, float] | None = None,
        device_last_seen: Mapping[str, float] | None = None,
        *,
        journal_marks: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Add counted usage, and when keys and devices were last used, in one transaction:
        either all of it is written or none (a retry must not count anything twice).
        ``journal_marks`` (meta key, value): how far usage journals are in the database, set
        in the same transaction, so a replay after a crash adds only what is not."""
        # In key order: two flushes writing the same rows at once (replicas sharing a
        # database) then lock them in the same order and cannot deadlock.
        rows = sorted(rows, key=lambda r: (r.principal, r.hour or 0))
        with self.transaction() as conn:
            conn.executemany(
                """INSERT INTO usage (principal, requests, prompt_tokens, completion_tokens,
                                      last_seen)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(principal) DO UPDATE SET
                     requests = usage.requests + excluded.requests,
                     prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,
                     completion_tokens = usage.completion_tokens + excluded.completion_tokens,
                     last_seen = CASE
                       WHEN excluded.last_seen IS NULL
                         OR excluded.last_seen > COALESCE(usage.last_seen, 0)
                       THEN excluded.last_seen ELSE COALESCE(usage.last_seen, 0) END""",
                [
                    (r.principal, r.requests, r.prompt_tokens, r.completion_tokens, r.last_seen)
                    for r in rows
                ],
            )
            bucketed = [r for r in rows if r.hour is not None]
            for table, column, size in (("usage_hours", "hour", HOUR), ("usage_days", "day", DAY)):
                conn.executemany(
                    f"INSERT INTO {table} (principal, {column}, requests, prompt_tokens, "  # noqa: S608
                    "completion_tokens) VALUES (?, ?, ?, ?, ?) "
                    f"ON CONFLICT(principal, {column}) DO UPDATE SET "
                    f"requests = {table}.requests + excluded.requests, "
                    f"prompt_tokens = {table}.prompt_tokens + excluded.prompt_tokens, "
                    f"completion_tokens = {table}.completion_tokens + excluded.completion_tokens",
                    [
                        (
                            r.principal,
                            (r.hour or 0) // size * size,
                            r.requests,
                            r.prompt_tokens,
                            r.completion_tokens,
                        )
                        for r in bucketed
                    ],
                )
            if bucketed:
                oldest_kept = min(r.hour or 0 for r in bucketed) - KEEP_HOURS_SECONDS
                conn.execute("DELETE FROM usage_hours WHERE hour < ?", (oldest_kept,))
            conn.executemany(
                "UPDATE api_keys SET last_used = ? WHERE id = ?",
                [(t, k) for k, t in sorted((key_last_used or {}).items())],
            )
            conn.executemany(
                "UPDATE devices SET last_seen = ? WHERE id = ?",
                [(t, d) for d, t in sorted((device_last_seen or {}).items())],
            )
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(journal_marks),
            )

    def forget_meta(self, key: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    def usage(self) -> list[UsageRow]:
        return [
            UsageRow(
                r["principal"],
                r["requests"],
                r["prompt_tokens"],
                r["completion_tokens"],
                r["last_seen"],
            )
            for r in self.query("SELECT * FROM usage ORDER BY principal")
        ]
