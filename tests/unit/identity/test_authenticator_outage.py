"""The authenticator while its database cannot be read: it fails closed, asks the database
at most twice a second meanwhile, says so once in the log, and after the outage reads
everything again, so that a revocation made during it is not missed."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, open_identity
from tray_app.errors import AuthError, StorageError
from tray_app.storage.database import Database


class BreakableDatabase(Database):
    """The real database, with reads that can be made to fail as an unreachable server's
    would; it counts how often it was asked anything."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.changes_unreadable = False  # changed_by_others fails
        self.rows_unreadable = False  # every query fails
        self.asked = 0
        self.hold: threading.Event | None = None  # changed_by_others and queries wait for it
        self.holding = threading.Event()

    def _fail(self) -> None:
        raise StorageError("LM Gate's database could not be read: server closed the connection.")

    def _held(self) -> None:
        if self.hold is not None:
            self.holding.set()
            self.hold.wait(10)

    def changed_by_others(self) -> bool:
        self.asked += 1
        self._held()
        if self.changes_unreadable:
            self._fail()
        return super().changed_by_others()

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[object]:  # type: ignore[override]
        self.asked += 1
        self._held()
        if self.rows_unreadable:
            self._fail()
        return super().query(sql, params)  # type: ignore[return-value]

    def down(self, is_down: bool = True) -> None:
        self.changes_unreadable = self.rows_unreadable = is_down


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        config = Config(storage_data_dir=str(tmp_path / "data"))
        self.clock = FakeClock()
        self.db = BreakableDatabase(tmp_path / "data" / "lmgate.db")
        self.here = open_identity(config, SIGNING_KEY, clock=self.clock, db=self.db)
        self.cli: Identity = open_identity(config, SIGNING_KEY, clock=FakeClock())
        self.key, self.record = self.here.api_keys.create("script", scopes=frozenset({"chat"}))

    def authenticate(self) -> str:
        return self.here.authenticator.authenticate(
            {"Authorization": f"Bearer {self.key}"}, None
        ).name

    def close(self) -> None:
        self.cli.close()
        self.here.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.close()


def test_a_valid_key_is_refused_while_the_database_cannot_be_read(rig: Rig) -> None:
    rig.authenticate()
    rig.db.down()
    rig.clock.advance(0.5)
    with pytest.raises(StorageError):
        rig.authenticate()
    with pytest.raises(StorageError):  # and between two checks as well, from memory
        rig.here.authenticator.check_state()


def test_during_an_outage_the_database_is_asked_at_most_twice_a_second(rig: Rig) -> None:
    rig.authenticate()
    rig.db.down()
    rig.clock.advance(0.5)
    asked = rig.db.asked
    for _ in range(4):  # 0.4 s of requests: all refused, the database asked once
        with pytest.raises(StorageError):
            rig.authenticate()
        rig.clock.advance(0.1)
    assert rig.db.asked == asked + 1
    rig.clock.advance(0.11)  # half a second after the failed check, whatever the rounding
    with pytest.raises(StorageError):
        rig.authenticate()
    assert rig.db.asked == asked + 2


def test_it_recovers_by_itself_and_the_log_tells_the_outage_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.db.down()
    with caplog.at_level(logging.WARNING, logger="lmgate.identity"):
        for _ in range(3):
            rig.clock.advance(0.5)
            with pytest.raises(StorageError):
                rig.authenticate()
        rig.db.down(False)
        with pytest.raises(StorageError):  # not before the next check is due
            rig.authenticate()
        rig.clock.advance(0.5)
        assert rig.authenticate() == str(rig.record.principal)
        assert rig.authenticate() == str(rig.record.principal)  # and between checks after it
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0] == (
        "credentials cannot be checked, every request is refused: "
        "LM Gate's database could not be read: server closed the connection."
    )
    assert messages[1] == "credentials can be checked again"


def test_a_revocation_made_during_the_outage_holds_after_it(rig: Rig) -> None:
    rig.authenticate()
    rig.db.down()
    rig.clock.advance(0.5)
    with pytest.raises(StorageError):
        rig.authenticate()
    rig.cli.api_keys.revoke(rig.record.id)  # another replica, or the CLI
    rig.db.down(False)
    rig.clock.advance(0.5)
    with pytest.raises(AuthError) as caught:
        rig.authenticate()
    assert caught.value.code == "api_key_revoked"


def test_a_reload_cut_short_is_done_again_though_no_new_change_came(rig: Rig) -> None:
    # The change was seen (and so consumed), then reading the keys failed: the next check
    # must read them again, though the database says nothing changed since.
    rig.authenticate()
    rig.cli.api_keys.revoke(rig.record.id)
    rig.db.rows_unreadable = True
    rig.clock.advance(0.5)
    with pytest.raises(StorageError):
        rig.authenticate()
    rig.db.rows_unreadable = False
    rig.clock.advance(0.5)
    with pytest.raises(AuthError) as caught:
        rig.authenticate()
    assert caught.value.code == "api_key_revoked"
    # Read again once, not at every check from then on.
    asked = rig.db.asked
    rig.clock.advance(0.5)
    with pytest.raises(AuthError):
        rig.authenticate()
    assert rig.db.asked == asked + 1  # only whether something changed


def test_a_request_does_not_wait_for_a_refresh_another_thread_is_making(rig: Rig) -> None:
    """A remote database's calls run on a few threads: while one waits on the database for
    the refresh, the others go on with what is in memory (the gateway bounds that wait)."""
    name = rig.authenticate()
    rig.db.hold = release = threading.Event()
    rig.clock.advance(0.5)
    refreshing = threading.Thread(target=rig.authenticate)
    refreshing.start()
    try:
        assert rig.db.holding.wait(5)
        rig.clock.advance(0.5)  # another refresh is due, but one is being made
        done = threading.Event()
        answered: list[str] = []

        def ask() -> None:
            answered.append(rig.authenticate())
            done.set()

        other = threading.Thread(target=ask)
        other.start()
        assert done.wait(2), "a request waited for another thread's refresh"
        assert answered == [name]
        other.join(5)
    finally:
        release.set()
        refreshing.join(5)
    rig.db.hold = None
    rig.clock.advance(0.5)
    asked = rig.db.asked
    rig.authenticate()  # the lock was given back: the next due refresh asks again
    assert rig.db.asked > asked


def _refresh_held(rig: Rig) -> tuple[threading.Event, threading.Thread]:
    """A due refresh another thread is making, held inside the database until released."""
    rig.db.hold = release = threading.Event()
    rig.clock.advance(0.5)

    def refresh() -> None:
        with contextlib.suppress(AuthError, StorageError):
            rig.authenticate()

    refreshing = threading.Thread(target=refresh)
    refreshing.start()
    assert rig.db.holding.wait(5)
    return release, refreshing


def test_after_an_outage_a_request_is_refused_while_another_thread_reads_it_all_again(
    rig: Rig,
) -> None:
    """What memory holds may miss a revocation made during the outage: a request is not
    answered from it while the reload after the outage is still on its way."""
    rig.authenticate()
    rig.db.changes_unreadable = True
    rig.clock.advance(0.5)
    with pytest.raises(StorageError):
        rig.authenticate()
    rig.db.changes_unreadable = False
    release, refreshing = _refresh_held(rig)
    try:
        rig.clock.advance(0.5)
        with pytest.raises(StorageError):
            rig.authenticate()
    finally:
        release.set()
        refreshing.join(5)


def test_a_refresh_that_hangs_stops_requests_being_answered_from_memory(rig: Rig) -> None:
    name = rig.authenticate()
    release, refreshing = _refresh_held(rig)
    try:
        rig.clock.advance(0.5)
        assert rig.authenticate() == name  # half a second old: still trusted
        rig.clock.advance(0.5)
        assert rig.authenticate() == name  # a second, the most it may be
        rig.clock.advance(0.1)
        with pytest.raises(StorageError, match=r"^LM Gate's database is slow to answer"):
            rig.authenticate()
    finally:
        release.set()
        refreshing.join(5)
