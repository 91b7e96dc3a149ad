"""`lmgate state migrate --to postgres`: one machine's SQLite records copied into a team
gateway's empty PostgreSQL, checked, and then used by a real replica; refused when the
destination holds anything, without the URL's password anywhere in what it prints."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_lmstudio import FakeLMStudio, fake_on_a_thread
from tests.helpers import LMGATE
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer
from tests.replicas import DOMAIN, TeamGateway
from tray_app.clock import SystemClock
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.copy import TABLES
from tray_app.storage.credentials import CredentialStore
from tray_app.storage.database import HOUR, Database, UsageRow
from tray_app.storage.postgres import PostgresDatabase

PHOTO = "data:image/png;base64," + "iVBORw0KGgo" * 4000  # a large value, as photos are


@pytest.fixture
def upstream() -> Iterator[FakeLMStudio]:
    yield from fake_on_a_thread()


class OneMachine:
    """A SQLite LM Gate in ``home``, driven through its CLI as its owner would."""

    def __init__(self, home: Path, database_url: str) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
        self.env.update(
            {
                "LMGATE_CONFIG": str(home / "none.toml"),
                "LMGATE_STORAGE_DATA_DIR": str(home / "data"),
                "LMGATE_SECRETS_STORE": "env",
                "LMGATE_SECRET_STATE_DATABASE_URL": database_url,
            }
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LMGATE, *args], capture_output=True, text=True, timeout=120, env=self.env
        )

    def fill(self) -> str:
        made = self.run("key", "create", "laptop")
        assert made.returncode == 0, made.stderr
        key = re.search(r"\blmg_[A-Za-z0-9_-]+", made.stdout)
        assert key
        for n in range(3):
            assert self.run("key", "create", f"script-{n}").returncode == 0
        assert self.run("budget", "set", "laptop", "--day", "50000").returncode == 0
        db = Database.in_directory(self.home / "data")
        try:
            conversations = ConversationStore(db, SystemClock())
            for n in range(450):  # more than one batch of rows
                chat = conversations.create("key:owner", f"question {n}", "m")
                conversations.append(chat.id, "user", f"question {n}", image=PHOTO)
                conversations.append(chat.id, "assistant", f"answer {n}", reasoning="because")
            hour = 1_800_000_000 // HOUR * HOUR
            db.add_usage(
                [UsageRow(f"key:{n}", n + 1, 10 * n, 20 * n, 1.8e9, hour=hour) for n in range(30)]
            )
        finally:
            db.close()
        return key.group(0)


def test_records_move_in_and_a_replica_serves_the_old_key(
    tmp_path: Path,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    upstream: FakeLMStudio,
) -> None:
    url = postgres_server.new_database()
    machine = OneMachine(tmp_path, url)
    key = machine.fill()
    source = Database.in_directory(tmp_path / "data")
    expected = {t: int(source.query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in TABLES}
    source.close()
    assert expected["messages"] == 900 and expected["api_keys"] == 4

    moved = machine.run("state", "migrate", "--to", "postgres")
    assert moved.returncode == 0, moved.stderr
    for table, rows in expected.items():
        assert re.search(rf"^  {table}\s+{rows} rows$", moved.stdout, re.M), moved.stdout
    assert "rows compared value by value" in moved.stdout
    assert postgres_server.password not in moved.stdout + moved.stderr

    shared = PostgresDatabase.connect(url)
    try:
        copied = {t: int(shared.query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in TABLES}
        assert copied == expected
        names = sorted(k.name for k in CredentialStore(shared).api_keys())
        assert names == ["laptop", "script-0", "script-1", "script-2"]
        chats = ConversationStore(shared, SystemClock())
        newest = chats.for_principal("key:owner")[0]
        assert [m.image for m in chats.messages(newest.id)] == [PHOTO, None]
        assert shared.usage() and sum(r.requests for r in shared.usage()) == sum(range(1, 31))
    finally:
        shared.close()

    # A replica on the copy: the old key works, and what it writes continues the copied ids.
    team = TeamGateway(tmp_path / "team", url, redis_server.url, upstream.url)
    (tmp_path / "team").mkdir()
    try:
        team.start(1)

        async def models() -> int:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    team.replicas[0].url + "/v1/models",
                    headers={"Authorization": f"Bearer {key}", "Host": DOMAIN},
                ) as r,
            ):
                return r.status

        assert asyncio.run(models()) == 200
        assert team.cli("key", "create", "after-the-move").returncode == 0
        audit = team.cli("audit")
        assert audit.returncode == 0 and "after-the-move" in audit.stdout
    finally:
        team.close()


def test_a_destination_that_holds_anything_is_refused_and_left_as_it_was(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.new_database()
    machine = OneMachine(tmp_path, url)
    machine.fill()
    assert machine.run("state", "migrate", "--to", "postgres").returncode == 0
    again = machine.run("state", "migrate", "--to", "postgres")
    assert again.returncode == 1
    assert "already holds" in again.stderr and "nothing was changed" in again.stderr
    shared = PostgresDatabase.connect(url)
    try:
        assert int(shared.query("SELECT COUNT(*) FROM api_keys")[0][0]) == 4
    finally:
        shared.close()


def test_without_a_database_or_its_url_it_says_what_is_missing(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    machine = OneMachine(tmp_path, postgres_server.new_database())
    nothing = machine.run("state", "migrate", "--to", "postgres")
    assert nothing.returncode == 1 and "There is no LM Gate database at" in nothing.stderr
    machine.fill()
    del machine.env["LMGATE_SECRET_STATE_DATABASE_URL"]
    no_url = machine.run("state", "migrate", "--to", "postgres")
    assert no_url.returncode == 1
    assert "lmgate secret set state-database-url" in no_url.stderr
