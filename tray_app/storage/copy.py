"""Moving in: one machine's SQLite database copied into a team gateway's empty PostgreSQL
(`lmgate state migrate --to postgres`).

Everything is copied in one transaction, so a copy cut short leaves the destination empty and
can simply be run again; a destination that holds anything is refused (nothing is merged or
overwritten). Rows are read in batches, so a large history of conversations with photos
never sits in memory at once. Afterwards every table's rows are counted on both sides and a
sample of each (its first and last rows, and some between) compared value by value.

The destination keeps its own bookkeeping: its schema version, its change counter, and
the fingerprint of the replicas' signing master, which the first replica to start claims.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tray_app.errors import StorageError
from tray_app.storage.database import Connection, Database, Row
from tray_app.storage.postgres import PostgresDatabase

# Parents before children (messages refer to conversations).
TABLES = (
    "api_keys",
    "tokens",
    "devices",
    "pairing_codes",
    "budgets",
    "usage",
    "usage_hours",
    "usage_days",
    "audit",
    "conversations",
    "messages",
)
# Each table's columns as both backends have them, in its natural order: the first ones its
# key, by which batches are read and samples compared.
COLUMNS: dict[str, tuple[str, ...]] = {
    "api_keys": (
        "id", "name", "key_hash", "scopes", "models", "created", "expires", "last_used",
        "revoked",
    ),
    "tokens": (
        "jti", "sub", "name", "kind", "scopes", "models", "max_tokens", "created", "expires",
        "revoked", "device_id", "issued_sub",
    ),
    "devices": ("id", "name", "created", "last_seen", "revoked"),
    "pairing_codes": ("code_hash", "created", "expires", "used", "device_id", "device_name"),
    "budgets": ("principal", "tokens_per_day", "tokens_per_month", "updated"),
    "usage": ("principal", "requests", "prompt_tokens", "completion_tokens", "last_seen"),
    "usage_hours": ("principal", "hour", "requests", "prompt_tokens", "completion_tokens"),
    "usage_days": ("principal", "day", "requests", "prompt_tokens", "completion_tokens"),
    "audit": ("id", "at", "action", "principal", "name", "source", "detail"),
    "conversations": ("id", "principal", "title", "model", "created", "updated", "system"),
    "messages": ("id", "conversation_id", "role", "content", "reasoning", "created", "image"),
}  # fmt: skip
KEYS: dict[str, tuple[str, ...]] = {
    "usage_hours": ("principal", "hour"),
    "usage_days": ("principal", "day"),
}
# Rows whose order of insertion the stores rely on (ties in ORDER BY created): copied in
# SQLite's rowid order, so the destination's own rowid keeps it.
IN_INSERTION_ORDER = frozenset({"api_keys", "tokens", "devices", "budgets", "conversations"})
# The destination's own: never copied.
OWN_META = frozenset({"schema_version", "shared_changes", "signing_master_fingerprint"})
BATCH_ROWS = 200
SAMPLE_ROWS = 20


@dataclass(frozen=True, slots=True)
class CopyReport:
    copied: dict[str, int]  # table -> rows, counted again on both sides after the copy
    sampled: int  # rows compared value by value


def _key(table: str) -> tuple[str, ...]:
    return KEYS.get(table, COLUMNS[table][:1])


def _order(table: str) -> str:
    return "rowid" if table in IN_INSERTION_ORDER else ", ".join(_key(table))


def _batches(source: Database, table: str) -> Iterator[list[Row]]:
    columns = ", ".join(COLUMNS[table])
    offset = 0
    while True:
        rows = source.query(
            f"SELECT {columns} FROM {table} ORDER BY {_order(table)} LIMIT ? OFFSET ?",  # noqa: S608 - names are constants
            (BATCH_ROWS, offset),
        )
        if not rows:
            return
        yield rows
        offset += len(rows)


def _count(db: Database | Connection, table: str) -> int:
    sql = f"SELECT COUNT(*) FROM {table}"  # noqa: S608 - a constant
    if isinstance(db, Database):
        return int(db.query(sql)[0][0])
    return int(db.execute(sql).fetchone()[0])


def copy_database(source: Database, destination: Database) -> CopyReport:
    """Copy ``source`` into ``destination`` (empty), then check the copy; StorageError if the
    destination is not empty, or the copy does not match (then it is rolled back)."""
    with destination.transaction(notify=True) as conn:
        for table in TABLES:
            held = _count(conn, table)
            if held:
                raise StorageError(
                    f"The shared database already holds {held} rows in {table}: LM Gate copies "
                    "only into an empty one, and nothing was changed."
                )
        for row in source.query("SELECT key, value FROM meta ORDER BY key"):
            if row["key"] not in OWN_META:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value",
                    (row["key"], row["value"]),
                )
        for table in TABLES:
            columns = COLUMNS[table]
            insert = (
                f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - constants
                f"VALUES ({', '.join('?' * len(columns))})"
            )
            for rows in _batches(source, table):
                conn.executemany(insert, [tuple(r) for r in rows])
        _continue_identities(destination, conn)
        copied = {table: _count(conn, table) for table in TABLES}
        expected = {table: _count(source, table) for table in TABLES}
        if copied != expected:
            differing = sorted(t for t in TABLES if copied[t] != expected[t])
            raise StorageError(f"The copy does not match in {', '.join(differing)}; rolled back.")
        sampled = sum(_compare_sample(source, conn, table) for table in TABLES)
    return CopyReport(copied, sampled)


def _continue_identities(destination: Database, conn: Connection) -> None:
    # Rows came with their ids: the next one made in PostgreSQL must come after them.
    if not isinstance(destination, PostgresDatabase):
        return  # SQLite's AUTOINCREMENT continues after the largest id by itself
    for table in ("audit", "messages"):
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608 - constants
            f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
        )


def _compare_sample(source: Database, conn: Connection, table: str) -> int:
    total = _count(source, table)
    if not total:
        return 0
    step = max(1, total // SAMPLE_ROWS)
    positions = sorted({*range(0, total, step), total - 1})
    columns = ", ".join(COLUMNS[table])
    key = _key(table)
    where = " AND ".join(f"{k} = ?" for k in key)
    for position in positions:
        (row,) = source.query(
            f"SELECT {columns} FROM {table} ORDER BY {_order(table)} LIMIT 1 OFFSET ?",  # noqa: S608
            (position,),
        )
        ident = tuple(row[k] for k in key)
        copy = conn.execute(
            f"SELECT {columns} FROM {table} WHERE {where}",  # noqa: S608 - constants
            ident,
        ).fetchone()
        if copy is None or tuple(copy) != tuple(row):
            raise StorageError(f"The copy of a row in {table} does not match; rolled back.")
    return len(positions)
