"""The stores on a real PostgreSQL (tests.postgres_server): what SQLite guarantees by its one
write lock holds across connections, errors never show the URL's password, an outage is a
StorageError within seconds and the pool recovers by itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.postgres_server import PostgresServer
from tray_app.errors import StorageError
from tray_app.storage.audit import AuditLog, AuditSource
from tray_app.storage.budgets import Budget, BudgetStore
from tray_app.storage.credentials import CodeRefusal, CredentialStore, DeviceRow
from tray_app.storage.database import HOUR, UsageRow
from tray_app.storage.postgres import PostgresDatabase, translate
from tray_app.storage.usage_history import UsageHistory


@pytest.fixture
def pg(postgres_url: str) -> Iterator[PostgresDatabase]:
    db = PostgresDatabase.connect(postgres_url, pool_size=8)
    yield db
    db.close()


def test_placeholders_become_psycopg_s() -> None:
    assert (
        translate("SELECT '50%' WHERE a = ? AND b = ?") == "SELECT '50%%' WHERE a = %s AND b = %s"
    )


def test_fifty_redemptions_of_one_code_pair_exactly_one_device(pg: PostgresDatabase) -> None:
    CredentialStore(pg).add_pairing_code("hash", 1.0, 1e12, None)
    results: list[object] = []
    start = threading.Barrier(50)

    def redeem(n: int) -> None:
        start.wait()
        results.append(CredentialStore(pg).redeem_pairing_code("hash", 2.0, f"dev{n}", "phone"))

    threads = [threading.Thread(target=redeem, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(CredentialStore(pg).devices()) == 1
    assert sum(r is CodeRefusal.USED for r in results) == 49
    assert [e.action for e in AuditLog(pg).entries()] == ["paired"]


def test_usage_from_eight_threads_sums_exactly(pg: PostgresDatabase) -> None:
    def flush() -> None:
        for _ in range(10):
            pg.add_usage(
                [
                    UsageRow("key:b", 1, 2, 3, 5.0, 10 * HOUR),
                    UsageRow("key:a", 1, 1, 1, 6.0, 10 * HOUR),
                ]
            )

    threads = [threading.Thread(target=flush) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [(u.principal, u.requests, u.prompt_tokens, u.last_seen) for u in pg.usage()] == [
        ("key:a", 80, 80, 6.0),
        ("key:b", 80, 160, 5.0),
    ]
    totals = UsageHistory(pg).totals_since("key:b", 0)
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (80, 160, 240)
    assert type(totals.requests) is int


def test_another_replica_notices_a_revocation_once(postgres_url: str, pg: PostgresDatabase) -> None:
    other = PostgresDatabase.connect(postgres_url, pool_size=2)
    try:
        assert not other.changed_by_others()
        BudgetStore(pg).set("key:x", Budget(5), now=1.0, source=AuditSource.CLI)
        assert not pg.changed_by_others()  # its own change
        assert other.changed_by_others() and not other.changed_by_others()
        assert BudgetStore(other).get("key:x") == Budget(5)
        CredentialStore(pg).revoke_for_key_rotation(2.0)
        assert other.changed_by_others() and other.meta("signing_key_generation") == "1"
    finally:
        other.close()


def test_the_schema_is_made_once_when_five_connect_at_once(postgres_url: str) -> None:
    opened: list[PostgresDatabase] = []
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            opened.append(PostgresDatabase.connect(postgres_url, pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == [] and len(opened) == 5
        assert opened[0].meta("schema_version") == "4"
    finally:
        for db in opened:
            db.close()


@pytest.mark.parametrize("wrong", ["password", "database"])
def test_a_refused_connection_says_why_without_the_password(
    postgres_server: PostgresServer, wrong: str
) -> None:
    url = (
        postgres_server.url(password="not-" + postgres_server.password)
        if wrong == "password"
        else postgres_server.url("no_such_db")
    )
    with pytest.raises(StorageError) as refused:
        PostgresDatabase.connect(url)
    message = str(refused.value)
    assert postgres_server.password not in message and url not in message
    assert f"127.0.0.1:{postgres_server.port}" in message


def test_down_is_a_storage_error_within_seconds_then_it_recovers(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    db = PostgresDatabase.connect(postgres_url, pool_size=2, timeout=2.0)
    try:
        CredentialStore(db).add_pairing_code("a", 1.0, 1e12, None)
        postgres_server.stop()
        began = time.monotonic()
        with pytest.raises(StorageError) as down:
            CredentialStore(db).devices()
        assert time.monotonic() - began < 2  # one pool wait at most
        assert postgres_server.password not in str(down.value)
        assert not db.reachable
        began = time.monotonic()  # from now on nobody waits: the gateway's loop calls in
        with pytest.raises(StorageError) as again:
            CredentialStore(db).add_pairing_code("b", 1.0, 1e12, None)
        assert time.monotonic() - began < 0.05
        assert "cannot be reached; trying again in the background" in str(again.value)
        postgres_server.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                CredentialStore(db).add_pairing_code("c", 1.0, 1e12, None)
                break
            except StorageError:
                assert time.monotonic() < deadline, "the pool did not reconnect"
                time.sleep(0.2)
        assert db.reachable
        assert db.meta("schema_version") == "4"
    finally:
        db.close()
    with pytest.raises(StorageError) as closed:
        PostgresDatabase.connect(postgres_server.url(password="x"))
    assert postgres_server.password not in str(closed.value)


def test_state_backend_postgres_opens_the_shared_database(postgres_url: str) -> None:
    from tray_app.config.parsers import StateBackend
    from tray_app.config.settings import Config
    from tray_app.control.assembly import open_database
    from tray_app.secret_store.base import STATE_DATABASE_URL, MemorySecretStore

    store = MemorySecretStore()
    store.set(STATE_DATABASE_URL, postgres_url)
    db = open_database(Config(state_backend=StateBackend.POSTGRES), store)
    try:
        assert isinstance(db, PostgresDatabase) and db.meta("schema_version") == "4"
    finally:
        db.close()


def test_a_refused_pairing_code_writes_nothing_other_replicas_must_notice(
    postgres_url: str, pg: PostgresDatabase
) -> None:
    # A guess is refused by a read: it neither writes nor makes every replica reload.
    other = PostgresDatabase.connect(postgres_url, pool_size=2)
    try:
        store = CredentialStore(pg)
        store.add_pairing_code("used", 1.0, 1e12, None)
        store.add_pairing_code("old", 1.0, 2.0, None)
        assert isinstance(store.redeem_pairing_code("used", 5.0, "d1", "phone"), DeviceRow)
        other.changed_by_others()
        for code, refusal in (
            ("never-made", CodeRefusal.UNKNOWN),
            ("used", CodeRefusal.USED),
            ("old", CodeRefusal.EXPIRED),
        ):
            assert store.redeem_pairing_code(code, 5.0, "d2", "phone") is refusal
        assert not other.changed_by_others()
    finally:
        other.close()


def test_a_lock_waited_for_fails_the_request_in_a_second_not_the_replica(
    postgres_url: str, pg: PostgresDatabase
) -> None:
    import psycopg

    with psycopg.connect(postgres_url) as holder:  # another session holds the counter row
        holder.execute("SELECT value FROM meta WHERE key = 'shared_changes' FOR UPDATE")
        began = time.monotonic()
        with pytest.raises(StorageError, match="lock timeout"):
            BudgetStore(pg).set("key:x", Budget(5), now=1.0, source=AuditSource.CLI)
        assert time.monotonic() - began < 2
        holder.rollback()
    assert pg.reachable  # one request's failure, not an outage
    BudgetStore(pg).set("key:x", Budget(5), now=1.0, source=AuditSource.CLI)


def test_errors_never_name_a_password_that_a_slash_put_in_the_path() -> None:
    from tray_app.storage.postgres import _where

    assert "secret" not in _where("postgresql://lmgate:2024/secret@db.internal:5432/lmgate")
    assert _where("postgresql://u:p@db.internal:6543/team") == "db.internal:6543/team"


def test_connecting_to_a_made_schema_takes_no_lock_a_live_write_holds(
    postgres_url: str, pg: PostgresDatabase
) -> None:
    # CREATE INDEX IF NOT EXISTS locks its table even when the index is there: run on every
    # connect, it deadlocked with the replicas' writes. A write in progress must not matter.
    import psycopg

    with psycopg.connect(postgres_url) as writer:
        writer.execute("LOCK TABLE audit IN ROW EXCLUSIVE MODE")  # what an INSERT holds
        began = time.monotonic()
        PostgresDatabase.connect(postgres_url, pool_size=1).close()
        assert time.monotonic() - began < 2
        writer.rollback()
